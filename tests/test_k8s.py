"""The Kubernetes overlays render, validate strictly against the oldest and newest Kubernetes we support,
lint clean, and are consistent with each other and with the gateway's settings.

What needs a running gateway or Triton is in test_k8s_crosscheck.py; the Prometheus rules and
dashboard in test_k8s_monitoring.py. Each check here also runs on a broken fixture
(tests/fixtures/k8s-broken/) to show it can fail.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import k8s_checks as kc
from tests.requirements import require_tool

BROKEN = Path(__file__).parent / "fixtures" / "k8s-broken"

# What each overlay deploys (kind, name); docs/deploy.md and k8s/README.md describe the same.
COMMON = {
    ("Namespace", "imgserve"), ("ConfigMap", "imgserve-gateway"), ("ConfigMap", "imgserve-dashboard"),
    ("PersistentVolumeClaim", "model-repository"), ("Deployment", "imgserve"), ("Service", "imgserve"),
    ("HorizontalPodAutoscaler", "imgserve"), ("PodDisruptionBudget", "imgserve"),
    ("NetworkPolicy", "imgserve-default-deny"), ("NetworkPolicy", "imgserve-gateway"),
    ("ServiceMonitor", "imgserve-gateway"), ("PrometheusRule", "imgserve-gateway"),
}
TRITON = {
    ("Deployment", "imgserve-triton"), ("Service", "imgserve-triton"), ("HorizontalPodAutoscaler", "imgserve-triton"),
    ("PodDisruptionBudget", "imgserve-triton"), ("NetworkPolicy", "imgserve-triton"),
    ("ServiceMonitor", "imgserve-triton"), ("PrometheusRule", "imgserve-triton"),
}
EXPECTED = {"cpu": COMMON, "dev": COMMON, "sidecar": COMMON, "gpu": COMMON | TRITON,
            "gpu-object-store": COMMON | TRITON | {("ConfigMap", "imgserve-model-store")}}
ALL = tuple(EXPECTED)


@pytest.fixture(scope="module")
def kubectl() -> str:
    return require_tool("kubectl")


@pytest.fixture(scope="module")
def rendered(kubectl: str) -> dict[str, list[kc.Doc]]:
    return {overlay: kc.render(kc.K8S / "overlays" / overlay, kubectl) for overlay in ALL}


def pod_spec(docs: list[kc.Doc], name: str) -> dict:
    return kc.one(docs, "Deployment", name)["spec"]["template"]["spec"]


def containers(docs: list[kc.Doc], name: str) -> dict[str, dict]:
    return {c["name"]: c for c in pod_spec(docs, name)["containers"]}


# ------------------------------------------------------------------ render and schema

@pytest.mark.parametrize("overlay", ALL)
def test_overlay_renders_exactly_the_expected_objects(rendered: dict, overlay: str) -> None:
    docs = rendered[overlay]
    assert {(d["kind"], d["metadata"]["name"]) for d in docs} == EXPECTED[overlay]
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    assert {d["metadata"].get("namespace") for d in namespaced} == {"imgserve"}
    unlabelled = [d["metadata"]["name"] for d in docs
                  if d["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") != "imgserve"]
    assert unlabelled == []


@pytest.mark.parametrize("version", kc.K8S_VERSIONS)
@pytest.mark.parametrize("overlay", ALL)
def test_overlay_is_strictly_schema_valid(rendered: dict, overlay: str, version: str) -> None:
    assert kc.schema_problems(rendered[overlay], version) == []


@pytest.mark.parametrize("overlay", ALL)
def test_custom_resources_are_structurally_sound(rendered: dict, overlay: str) -> None:
    docs = rendered[overlay]
    assert kc.crd_problems(docs) == []
    assert [d["kind"] for d in docs if kc.is_crd(d)], "the CRD check must see the ServiceMonitors and rules"


def test_build_repository_job_is_schema_valid() -> None:
    docs = kc.load(kc.K8S / "jobs" / "build-repository.yaml")
    for version in kc.K8S_VERSIONS:
        assert kc.schema_problems(docs, version) == []
    (job,) = docs
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"][:1] == ["build-repo"] and "--model-repository" in container["args"]


def test_build_repository_job_writes_where_the_overlays_read(rendered: dict) -> None:
    job = kc.load(kc.K8S / "jobs" / "build-repository.yaml")
    for overlay in ("gpu", "sidecar", "cpu"):
        assert kc.repository_mount_problems(rendered[overlay] + job) == []
    wrong = json.loads(json.dumps(job))
    wrong[0]["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] = "elsewhere"
    assert any("different repositories" in p for p in kc.repository_mount_problems(rendered["gpu"] + wrong))


# ------------------------------------------------------------------ layout of each overlay

def test_gpu_runs_triton_as_its_own_deployment_on_the_gpu_pool(rendered: dict) -> None:
    docs = rendered["gpu"]
    triton_pod = pod_spec(docs, "imgserve-triton")
    (triton,) = triton_pod["containers"]
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d{2}\.\d{2}-py3", triton["image"])
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert triton_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in triton_pod["tolerations"])
    assert "--model-control-mode=explicit" in triton["args"]
    paths = {probe: triton[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert paths == {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready",
                     "livenessProbe": "/v2/health/live"}
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model load may take minutes"
    (gateway,) = pod_spec(docs, "imgserve")["containers"]
    assert "nvidia.com/gpu" not in gateway["resources"].get("limits", {})
    assert "nodeSelector" not in pod_spec(docs, "imgserve")


def test_gpu_gateway_finds_every_triton_pod_through_the_headless_service(rendered: dict) -> None:
    docs = rendered["gpu"]
    service = kc.one(docs, "Service", "imgserve-triton")
    assert service["spec"]["clusterIP"] == "None"
    pod_labels = kc.one(docs, "Deployment", "imgserve-triton")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    env = kc.gateway_env(docs)
    host, port = env["IMGSERVE_TRITON_URL"].split(":")
    assert host == service["metadata"]["name"]
    grpc = next(p for p in service["spec"]["ports"] if p["port"] == int(port))
    (triton,) = containers(docs, "imgserve-triton").values()
    assert kc.named_port(triton, grpc["targetPort"]) == int(port) and "--grpc-port=" + port in triton["args"]
    assert env["IMGSERVE_BACKEND"] == "triton"
    assert float(env["IMGSERVE_TRITON_RESOLVE_INTERVAL_S"]) > 0, "without re-resolving, new pods are never used"


def test_object_store_variant_reads_the_repository_from_a_secret_url(rendered: dict) -> None:
    docs = rendered["gpu-object-store"]
    (triton,) = containers(docs, "imgserve-triton").values()
    assert "--model-repository=$(MODEL_REPOSITORY_URL)" in triton["args"]
    env = {e["name"]: e for e in triton["env"]}
    assert env["MODEL_REPOSITORY_URL"]["valueFrom"]["configMapKeyRef"]["name"] == "imgserve-model-store"
    url = kc.one(docs, "ConfigMap", "imgserve-model-store")["data"]["MODEL_REPOSITORY_URL"]
    assert re.match(r"^(s3|gs)://", url)
    # credentials are files from the Secret, never environment variables
    volumes = {v["name"]: v for v in pod_spec(docs, "imgserve-triton")["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in triton["volumeMounts"]}
    secret_dir = env["AWS_SHARED_CREDENTIALS_FILE"]["value"].rsplit("/", 1)[0]
    assert mounts[secret_dir]["secret"]["secretName"] == "imgserve-model-store"
    assert env["GOOGLE_APPLICATION_CREDENTIALS"]["value"].startswith(secret_dir + "/")
    assert "/models" not in mounts


def test_sidecar_runs_triton_in_the_gateway_pod(rendered: dict) -> None:
    docs = rendered["sidecar"]
    pod = containers(docs, "imgserve")
    assert set(pod) == {"gateway", "triton"}
    assert pod["triton"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    grpc_port = next(p["containerPort"] for p in pod["triton"]["ports"] if p["name"] == "triton-grpc")
    assert kc.gateway_env(docs)["IMGSERVE_TRITON_URL"] == f"127.0.0.1:{grpc_port}"


@pytest.mark.parametrize("overlay", ["cpu", "dev"])
def test_cpu_overlays_use_the_embedded_backend(rendered: dict, overlay: str) -> None:
    docs = rendered[overlay]
    (gateway,) = containers(docs, "imgserve").values()
    env = kc.gateway_env(docs)
    assert env["IMGSERVE_BACKEND"] == "onnxruntime" and "IMGSERVE_TRITON_URL" not in env
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert str(ports["grpc"]) == env["IMGSERVE_GRPC_PORT"] and str(ports["http"]) == env["IMGSERVE_HTTP_PORT"]


def test_dev_is_one_small_replica_that_does_not_block_drains(rendered: dict) -> None:
    docs = rendered["dev"]
    assert kc.one(docs, "Deployment", "imgserve")["spec"]["replicas"] == 1
    assert kc.one(docs, "HorizontalPodAutoscaler", "imgserve")["spec"]["minReplicas"] == 1
    assert kc.one(docs, "PodDisruptionBudget", "imgserve")["spec"] == {
        "maxUnavailable": 1, "selector": kc.one(docs, "PodDisruptionBudget", "imgserve")["spec"]["selector"]}
    (gateway,) = containers(docs, "imgserve").values()
    assert gateway["resources"]["requests"]["cpu"] == "250m"


@pytest.mark.parametrize("overlay", ALL)
def test_every_deployment_has_a_pdb_and_an_hpa(rendered: dict, overlay: str) -> None:
    docs = rendered[overlay]
    for deployment in kc.find(docs, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        pdbs = [p for p in kc.find(docs, "PodDisruptionBudget")
                if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(pdbs) == 1, deployment["metadata"]["name"]
        hpas = [h for h in kc.find(docs, "HorizontalPodAutoscaler")
                if h["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]]
        assert len(hpas) == 1, deployment["metadata"]["name"]


@pytest.mark.parametrize("overlay", ALL)
def test_hpas_scale_on_metrics_the_adapter_serves_with_a_cpu_fallback(rendered: dict, overlay: str) -> None:
    docs = rendered[overlay]
    assert kc.hpa_problems(docs) == []
    gateway = kc.one(docs, "HorizontalPodAutoscaler", "imgserve")["spec"]["metrics"]
    assert {m["type"] for m in gateway} == {"Pods", "Resource"}
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in gateway)
    for triton in kc.find(docs, "HorizontalPodAutoscaler", "imgserve-triton"):
        (metric,) = triton["spec"]["metrics"]
        assert metric["pods"]["metric"]["name"] == "triton_queue_duration_us_per_request"


# ------------------------------------------------------------------ safety

@pytest.mark.parametrize("overlay", ALL)
def test_pods_are_locked_down(rendered: dict, overlay: str) -> None:
    for workload, container in kc.pod_containers(rendered[overlay]):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert "memory" in container["resources"]["limits"]


@pytest.mark.parametrize("overlay", ALL)
def test_drain_timing_matches_the_gateway_settings(rendered: dict, overlay: str) -> None:
    assert kc.drain_problems(rendered[overlay]) == []


@pytest.mark.parametrize("overlay", ALL)
def test_gateway_args_and_settings_are_ones_imgserve_serve_knows(rendered: dict, overlay: str) -> None:
    assert kc.serve_arg_problems(rendered[overlay]) == []


@pytest.mark.parametrize("overlay", ALL)
def test_repository_is_mounted_where_the_gateway_and_triton_read_it(rendered: dict, overlay: str) -> None:
    assert kc.repository_mount_problems(rendered[overlay]) == []


# NetworkPolicy semantics, evaluated the way the API documents them (ingress only).
def _selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items() and not selector.get("matchExpressions")


def ingress_allowed(docs: list[kc.Doc], *, src_ns: str, src_labels: dict, dst: str, port: int) -> bool:
    """Whether a pod (namespace, labels) may open a TCP connection to Deployment ``dst`` on ``port``."""
    deployment = kc.one(docs, "Deployment", dst)
    dst_labels = deployment["spec"]["template"]["metadata"]["labels"]
    dst_ns = deployment["metadata"]["namespace"]
    container_ports = {p["name"]: p["containerPort"] for c in deployment["spec"]["template"]["spec"]["containers"]
                       for p in c.get("ports", [])}
    policies = [p for p in kc.find(docs, "NetworkPolicy") if p["metadata"]["namespace"] == dst_ns
                and "Ingress" in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], dst_labels)]
    if not policies:
        return True
    ns_labels = {"kubernetes.io/metadata.name": src_ns}
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = [container_ports.get(p["port"], p["port"]) for p in rule.get("ports", [])]
            if ports and port not in ports:
                continue
            for peer in rule.get("from", [{}]):
                ns_ok = _selects(peer["namespaceSelector"], ns_labels) if "namespaceSelector" in peer else src_ns == dst_ns
                pod_ok = _selects(peer["podSelector"], src_labels) if "podSelector" in peer else True
                if ns_ok and pod_ok:
                    return True
    return False


def test_network_policies_let_only_the_gateway_reach_triton_and_monitoring_scrape_it(rendered: dict) -> None:
    docs = rendered["gpu"]
    gateway = kc.one(docs, "Deployment", "imgserve")["spec"]["template"]["metadata"]["labels"]
    other = {"app.kubernetes.io/name": "something-else"}

    def allowed(ns: str, labels: dict, dst: str, port: int) -> bool:
        return ingress_allowed(docs, src_ns=ns, src_labels=labels, dst=dst, port=port)

    assert allowed("imgserve", gateway, "imgserve-triton", 8001)
    assert not allowed("imgserve", other, "imgserve-triton", 8001)
    assert not allowed("default", gateway, "imgserve-triton", 8001)
    assert not allowed("imgserve", gateway, "imgserve-triton", 8000)
    assert allowed("monitoring", other, "imgserve-triton", 8002)
    assert not allowed("default", other, "imgserve-triton", 8002)
    assert allowed("default", other, "imgserve", 8500) and allowed("monitoring", other, "imgserve", 8080)


# ------------------------------------------------------------------ lint and security scan

def test_manifests_pass_yamllint() -> None:
    assert kc.yamllint_problems(sorted(kc.K8S.rglob("*.yaml"))) == []


@pytest.fixture(scope="module")
def checkov_findings(rendered: dict, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """One checkov run (it takes ~10 s to start) over every rendered overlay, the Job and the broken fixture."""
    checkov = require_tool("checkov")
    out = tmp_path_factory.mktemp("checkov")
    files = []
    for overlay, docs in rendered.items():
        path = out / f"{overlay}.yaml"
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        files.append(path)
    return kc.checkov_problems(checkov, [*files, kc.K8S / "jobs" / "build-repository.yaml", BROKEN / "objects.yaml"])


def test_rendered_overlays_have_no_checkov_findings(checkov_findings: list[str]) -> None:
    assert [p for p in checkov_findings if "objects.yaml" not in p] == []


# ------------------------------------------------------------------ every check catches the broken fixture

@pytest.fixture(scope="module")
def broken() -> list[kc.Doc]:
    return kc.load(BROKEN / "objects.yaml")


def test_broken_kustomization_fails_to_render(kubectl: str) -> None:
    with pytest.raises(subprocess.CalledProcessError) as caught:
        kc.render(BROKEN / "kustomization", kubectl)
    assert "does-not-exist.yaml" in caught.value.stderr


def test_broken_fixture_fails_the_schema_check(broken: list[kc.Doc]) -> None:
    for version in kc.K8S_VERSIONS:
        problems = kc.schema_problems(broken, version)
        assert any("imagePullPolicyy" in p for p in problems), problems
        assert any("no schema" in p and "Widget" in p for p in problems), problems


def test_broken_fixture_fails_the_crd_check(broken: list[kc.Doc]) -> None:
    problems = kc.crd_problems(broken)
    assert any("port 'metrics' is not a named port" in p for p in problems), problems
    assert any("has no severity" in p for p in problems), problems


def test_broken_fixture_fails_the_yamllint_check() -> None:
    problems = kc.yamllint_problems([BROKEN / "lint.yaml"])
    assert any("duplication of key" in p for p in problems), problems


def test_broken_fixture_fails_the_checkov_check(checkov_findings: list[str]) -> None:
    broken_findings = [p for p in checkov_findings if "objects.yaml" in p]
    assert any(p.startswith("CKV_K8S_16 ") for p in broken_findings), broken_findings   # privileged container


def test_broken_fixture_fails_the_code_consistency_checks(broken: list[kc.Doc]) -> None:
    assert any("rejects args" in p for p in kc.serve_arg_problems(broken))
    assert any("IMGSERVE_GRPC_PROT is not a gateway setting" in p for p in kc.serve_arg_problems(broken))
    drain = kc.drain_problems(broken)
    assert any("no preStop" in p for p in drain) and any("terminationGracePeriodSeconds 5" in p for p in drain)
    assert any("'/models' is not a mount path" in p for p in kc.repository_mount_problems(broken))
    assert any("imgserve_gpu_load" in p for p in kc.hpa_problems(broken))
