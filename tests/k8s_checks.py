"""Checks of the Kubernetes manifests, each a function returning the problems it finds (empty: clean).

Shared by the tests of the real overlays and by the tests that feed each check a deliberately
broken fixture (tests/fixtures/k8s-broken/), so every check is shown to be able to fail.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ("cpu", "dev", "gpu", "sidecar")
# Oldest Kubernetes we support and the newest kubernetes-validate bundles; both are checked.
K8S_VERSIONS = ("1.30.0", "1.37.0")
# Prometheus Operator CRDs: no bundled schema; crd_problems() and promtool check them instead.
CRD_GROUPS = ("monitoring.coreos.com/",)
ADAPTER_VALUES = K8S / "monitoring" / "prometheus-adapter-values.yaml"
DASHBOARD = K8S / "base" / "dashboards" / "imgserve.json"
# Series Prometheus makes itself (not on any /metrics page).
PROMETHEUS_SERIES = frozenset({"up"})
METRIC_NAME = re.compile(r"\b(?:imgserve|nv)_[a-z0-9_]+\b|\bup\b(?=\s*\{)")
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
YAMLLINT_CONFIG = ("extends: default\nrules:\n  line-length: {max: 140}\n  document-start: disable\n"
                   "  comments: {min-spaces-from-content: 1}\n  truthy: {check-keys: false}\n")

Doc = dict[str, Any]


# ------------------------------------------------------------------ rendering and lookup

def render(kustomization_dir: Path, kubectl: str = "kubectl") -> list[Doc]:
    """`kubectl kustomize DIR` as a list of objects; raises CalledProcessError with kustomize's complaint."""
    out = subprocess.run([kubectl, "kustomize", str(kustomization_dir)], check=True, capture_output=True,
                         text=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def load(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    (doc,) = find(docs, kind, name)
    return doc


def is_crd(doc: Doc) -> bool:
    return doc["apiVersion"].startswith(CRD_GROUPS)


def pod_containers(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(workload, container) for every container of every Deployment and Job."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            for container in doc["spec"]["template"]["spec"]["containers"]:
                yield doc, container


def gateway_env(docs: list[Doc]) -> dict[str, str]:
    """The gateway's IMGSERVE_* settings: its ConfigMap, then any env set on the container."""
    env: dict[str, str] = {}
    for workload, container in pod_containers(docs):
        if container["name"] != "gateway":
            continue
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef")
            if ref:
                env.update(one(docs, "ConfigMap", ref["name"])["data"])
        env.update({e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e})
    return env


def named_port(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container.get("ports", []) if p.get("name") == port)


# ------------------------------------------------------------------ schema, lint, security

def schema_problems(docs: list[Doc], version: str) -> list[str]:
    """kubernetes-validate, strict, for every non-CRD object; a missing schema is a problem too."""
    import kubernetes_validate

    problems = []
    for doc in docs:
        if is_crd(doc):
            continue
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{name} (k8s {version}): {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{name} (k8s {version}): no schema: {exc}")
    return problems


def crd_problems(docs: list[Doc]) -> list[str]:
    """Structural checks of the CRD objects we ship (no schema is bundled for them).

    ServiceMonitor: its selector matches a Service of the same render that has every port it
    scrapes. PrometheusRule: every rule has an expr, and alerts a severity and a summary.
    Anything else under monitoring.coreos.com is a problem (unknown to these checks).
    """
    problems = []
    services = find(docs, "Service")
    for doc in docs:
        if not is_crd(doc):
            continue
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        spec = doc.get("spec") or {}
        if doc["kind"] == "ServiceMonitor":
            wanted = spec.get("selector", {}).get("matchLabels", {})
            matching = [s for s in services if wanted and wanted.items() <= s["metadata"].get("labels", {}).items()]
            if not matching:
                problems.append(f"{name}: selector {wanted} matches no Service")
            endpoints = spec.get("endpoints") or []
            if not endpoints:
                problems.append(f"{name}: no endpoints")
            for endpoint in endpoints:
                if not any(endpoint.get("port") in {p.get("name") for p in s["spec"]["ports"]} for s in matching):
                    problems.append(f"{name}: port {endpoint.get('port')!r} is not a named port of {wanted}")
                if not str(endpoint.get("path", "/metrics")).startswith("/"):
                    problems.append(f"{name}: path must start with /")
        elif doc["kind"] == "PrometheusRule":
            groups = spec.get("groups") or []
            if not groups:
                problems.append(f"{name}: no groups")
            for group in groups:
                for rule in group.get("rules") or []:
                    label = rule.get("alert") or rule.get("record") or "?"
                    if not rule.get("expr"):
                        problems.append(f"{name}: rule {label} has no expr")
                    if "alert" in rule and rule.get("labels", {}).get("severity") not in ("warning", "critical"):
                        problems.append(f"{name}: alert {label} has no severity warning|critical")
                    if "alert" in rule and not rule.get("annotations", {}).get("summary"):
                        problems.append(f"{name}: alert {label} has no summary")
        else:
            problems.append(f"{name}: no check for this custom resource")
    return problems


def yamllint_problems(paths: list[Path]) -> list[str]:
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(YAMLLINT_CONFIG)
    return [f"{path}:{p.line}: {p.message}" for path in paths
            for p in linter.run(path.read_text(), conf, str(path)) if p.level == "error"]


def checkov_problems(checkov: str, files: list[Path]) -> list[str]:
    """Failed checkov checks (kubernetes framework). Open-source checkov reports no severities, so every
    failed check counts; a deliberate exception is suppressed inline (checkov.io/skipN annotation)."""
    args = [checkov, "--framework", "kubernetes", "--quiet", "--compact", "-o", "json"]
    for f in files:
        args += ["-f", str(f)]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode not in (0, 1) or not out.stdout.strip():
        return [f"checkov failed to run ({out.returncode}): {out.stderr[-2000:]}"]
    reports = json.loads(out.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    return [f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
            for r in reports for c in r.get("results", {}).get("failed_checks", [])]


# ------------------------------------------------------------------ consistency with the code

def serve_arg_problems(docs: list[Doc]) -> list[str]:
    """The gateway container's args parse with `imgserve serve`'s parser, and every IMGSERVE_* key is a setting."""
    from serving.cli import build_parser
    from serving.settings import ENV_PREFIX, Settings

    known = {ENV_PREFIX + name.upper() for name in Settings.__dataclass_fields__ if name != "extra"}
    problems = []
    for workload, container in pod_containers(docs):
        if container["name"] != "gateway":
            continue
        args = list(container.get("args", []))
        if args[:1] != ["serve"]:
            problems.append(f"{workload['metadata']['name']}: gateway args must start with 'serve', got {args}")
            continue
        try:
            build_parser().parse_args(args[1:])
        except SystemExit:
            problems.append(f"{workload['metadata']['name']}: `imgserve serve` rejects args {args[1:]}")
    for key in gateway_env(docs):
        if key.startswith(ENV_PREFIX) and key not in known:
            problems.append(f"{key} is not a gateway setting (serving/settings.py)")
    return problems


def preStop_sleep_s(container: Doc) -> float:
    command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return float(command[1]) if command[:1] == ["sleep"] and len(command) == 2 else 0.0


def drain_problems(docs: list[Doc]) -> list[str]:
    """Kubernetes must not SIGKILL a draining gateway: the grace period covers the preStop sleep plus the
    gateway's own drain (IMGSERVE_SHUTDOWN_GRACE_S) plus a margin for closing the backend. A Triton
    sidecar must stay up (preStop) until the gateway's drain is over."""
    from serving.settings import Settings

    margin_s = 10.0
    env = gateway_env(docs)
    drain_s = float(env.get("IMGSERVE_SHUTDOWN_GRACE_S", Settings.shutdown_grace_s))
    problems = []
    for workload, container in pod_containers(docs):
        if container["name"] != "gateway":
            continue
        pod = workload["spec"]["template"]["spec"]
        grace = float(pod.get("terminationGracePeriodSeconds", 30))
        pre = preStop_sleep_s(container)
        if pre <= 0:
            problems.append(f"{workload['metadata']['name']}: the gateway has no preStop sleep, so it can get "
                            "new connections after SIGTERM while endpoints update")
        if grace < pre + drain_s + margin_s:
            problems.append(f"{workload['metadata']['name']}: terminationGracePeriodSeconds {grace:g} < preStop "
                            f"{pre:g} + shutdown grace {drain_s:g} + {margin_s:g} s margin")
        for other in pod["containers"]:
            if other["name"] == "triton" and preStop_sleep_s(other) < pre + drain_s:
                problems.append(f"{workload['metadata']['name']}: the Triton sidecar's preStop "
                                f"({preStop_sleep_s(other):g} s) ends before the gateway's drain ({pre + drain_s:g} s)")
    return problems


def triton_repository_arg(container: Doc) -> str | None:
    for arg in list(container.get("command", [])) + list(container.get("args", [])):
        if arg.startswith("--model-repository="):
            return arg.split("=", 1)[1]
    return None


def repository_mount_problems(docs: list[Doc]) -> list[str]:
    """The gateway and Triton read the repository where it is mounted: the gateway's
    IMGSERVE_MODEL_REPOSITORY and Triton's --model-repository are mount paths of the same PVC
    (or, for Triton, an object store URL)."""
    env = gateway_env(docs)
    problems = []
    claims: set[str] = set()
    for workload, container in pod_containers(docs):
        pod = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {m["mountPath"]: volumes.get(m["name"], {}) for m in container.get("volumeMounts", [])}
        if container["name"] == "gateway":
            wanted = env.get("IMGSERVE_MODEL_REPOSITORY", "")
        elif container["name"] == "triton":
            wanted = triton_repository_arg(container) or ""
            if re.match(r"^(s3|gs|as)://|^\$\(", wanted):
                continue
        elif container["name"] == "build-repository":
            args = list(container.get("args", []))
            wanted = args[args.index("--model-repository") + 1] if "--model-repository" in args else ""
        else:
            continue
        volume = mounts.get(wanted)
        if volume is None:
            problems.append(f"{workload['metadata']['name']}/{container['name']}: repository {wanted!r} is not a mount path "
                            f"(mounts: {sorted(mounts)})")
        elif "persistentVolumeClaim" in volume:
            claims.add(volume["persistentVolumeClaim"]["claimName"])
    if len(claims) > 1:
        problems.append(f"the gateway and Triton mount different repositories: {sorted(claims)}")
    for claim in claims:
        if not find(docs, "PersistentVolumeClaim", claim):
            problems.append(f"PersistentVolumeClaim {claim} is mounted but not part of the render")
    return problems


def probes(docs: list[Doc]) -> list[tuple[str, str, str | None, int]]:
    """(container, probe, HTTP path or None for gRPC, port number) of every probe."""
    found = []
    for _, container in pod_containers(docs):
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            spec = container.get(probe)
            if not spec:
                continue
            if "httpGet" in spec:
                found.append((container["name"], probe, spec["httpGet"]["path"],
                              named_port(container, spec["httpGet"]["port"])))
            elif "grpc" in spec:
                found.append((container["name"], probe, None, named_port(container, spec["grpc"]["port"])))
    return found


# ------------------------------------------------------------------ metric names

def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression reads (imgserve_*, nv_* and Prometheus' own `up`)."""
    return set(METRIC_NAME.findall(QUOTED.sub('""', expr)))


def metric_references(docs: list[Doc], adapter_values: Path = ADAPTER_VALUES,
                      dashboard: Path = DASHBOARD) -> dict[str, set[str]]:
    """metric name -> where it is used: alert and recording rules, adapter rules, dashboard panels."""
    refs: dict[str, set[str]] = {}

    def add(expr: str, where: str) -> None:
        for name in promql_metric_names(expr):
            refs.setdefault(name, set()).add(where)

    for rule_doc in find(docs, "PrometheusRule"):
        for group in rule_doc["spec"]["groups"]:
            for rule in group["rules"]:
                add(rule["expr"], f"rule {rule.get('alert') or rule.get('record')}")
    for rule in yaml.safe_load(adapter_values.read_text())["rules"]["custom"]:
        add(rule["seriesQuery"], f"adapter {rule['name']['as']}")
        add(rule["metricsQuery"], f"adapter {rule['name']['as']}")
    board = json.loads(dashboard.read_text())
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            add(target["expr"], f"dashboard '{panel['title']}'")
    for variable in board.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            add(query.get("query", ""), f"dashboard variable {variable['name']}")
    return refs


def adapter_metric_names(adapter_values: Path = ADAPTER_VALUES) -> set[str]:
    return {rule["name"]["as"] for rule in yaml.safe_load(adapter_values.read_text())["rules"]["custom"]}


def hpa_problems(docs: list[Doc], adapter_values: Path = ADAPTER_VALUES) -> list[str]:
    """Every HPA targets a Deployment of the render, and each Pods/Object metric is one an adapter rule serves."""
    served = adapter_metric_names(adapter_values)
    problems = []
    for hpa in find(docs, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        if not find(docs, target["kind"], target["name"]):
            problems.append(f"HPA {hpa['metadata']['name']} targets {target['kind']}/{target['name']}, not rendered")
        for metric in hpa["spec"].get("metrics", []):
            kind = metric["type"]
            if kind in ("Pods", "Object"):
                name = metric[kind.lower()]["metric"]["name"]
                if name not in served:
                    problems.append(f"HPA {hpa['metadata']['name']}: no prometheus-adapter rule serves {name!r}")
    return problems


def exposed_metric_names(exposition: str) -> set[str]:
    """Sample and family names on a Prometheus text /metrics page."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def missing_metrics(refs: dict[str, set[str]], exposed: set[str]) -> list[str]:
    return [f"{name} (used by {', '.join(sorted(where))}) is on no /metrics page"
            for name, where in sorted(refs.items()) if name not in exposed and name not in PROMETHEUS_SERIES]


def rules_file(docs: list[Doc], path: Path) -> Path:
    """The PrometheusRules' groups as a plain Prometheus rules file, for promtool."""
    groups = [g for d in find(docs, "PrometheusRule") for g in d["spec"]["groups"]]
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def command_line(container: Doc) -> str:
    return shlex.join(list(container.get("command", [])) + list(container.get("args", [])))
