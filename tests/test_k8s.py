"""The Kubernetes manifests render with kustomize and pass the real Kubernetes schemas."""
from __future__ import annotations

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.requirements import require_tool

K8S = Path(__file__).resolve().parents[1] / "k8s"
K8S_VERSION = "1.30.0"

@pytest.fixture(autouse=True)
def kubectl() -> str:
    """kubectl renders the overlays (kustomize); missing, these tests skip locally and fail under CI."""
    return require_tool("kubectl", "kustomize renders the overlays")


def render(overlay: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
                         check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlay_is_schema_valid(overlay: str) -> None:
    docs = render(overlay)
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler",
                                         "PodDisruptionBudget", "PersistentVolumeClaim", "Namespace"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_schema_check_catches_a_typo() -> None:
    doc = by_kind(render("cpu"), "Deployment")
    doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_gpu_overlay_puts_triton_on_a_gpu_and_points_the_gateway_at_it() -> None:
    docs = render("gpu")
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"gateway", "triton"}
    assert containers["triton"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in containers["gateway"]["resources"].get("limits", {})
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert {v["name"] for v in pod["volumes"]} >= {"models", "tmp", "dshm"}
    settings = by_kind(docs, "ConfigMap")["data"]
    assert settings["IMGSERVE_BACKEND"] == "triton"
    grpc_port = next(p["containerPort"] for p in containers["triton"]["ports"] if p["name"] == "triton-grpc")
    assert settings["IMGSERVE_TRITON_URL"] == f"127.0.0.1:{grpc_port}"


def test_cpu_overlay_uses_the_embedded_backend_and_consistent_ports() -> None:
    docs = render("cpu")
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    (gateway,) = pod["containers"]
    settings = by_kind(docs, "ConfigMap")["data"]
    assert settings["IMGSERVE_BACKEND"] == "onnxruntime"
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert str(ports["grpc"]) == settings["IMGSERVE_GRPC_PORT"]
    assert str(ports["http"]) == settings["IMGSERVE_HTTP_PORT"]
    assert gateway["startupProbe"]["grpc"]["port"] == ports["grpc"]
    service_ports = {p["name"]: p["targetPort"] for p in by_kind(docs, "Service")["spec"]["ports"]}
    assert service_ports == {"grpc": "grpc", "http": "http"}


def test_manifests_pass_yamllint() -> None:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig("extends: default\nrules:\n  line-length: {max: 140}\n  document-start: disable\n"
                          "  comments: {min-spaces-from-content: 1}\n  truthy: {check-keys: false}\n")
    problems = [(str(path), p) for path in sorted(K8S.rglob("*.yaml"))
                for p in linter.run(path.read_text(), conf, str(path)) if p.level == "error"]
    assert problems == []
