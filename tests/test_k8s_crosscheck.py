"""The manifests against the running code: a real gateway (configured from the gpu overlay's ConfigMap,
finding Triton through a DNS name as it does through the headless Service) in front of a real
tritonserver (triton-local, started with the gpu overlay's Triton flags) over a repository that
`export` wrote. Probe paths and ports answer, container args are accepted, and every metric the
HPAs, adapter rules, alerts and dashboard name is on one of the two /metrics pages.
"""
from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from tests import k8s_checks as kc
from tests.procs import GatewayProcess, health_status, run_gateway
from tests.requirements import require_tool

pytestmark = [pytest.mark.slow, pytest.mark.triton]

BROKEN = Path(__file__).parent / "fixtures" / "k8s-broken"
# triton-local chooses these itself (free ports, the test's repository)
TRITON_LOCAL_OWNS = ("--model-repository=", "--grpc-port=", "--http-port=", "--metrics-port=", "--exit-timeout-secs=")


@dataclass
class Stack:
    docs: list[kc.Doc]
    gateway: GatewayProcess
    triton: object            # serving.triton_local.TritonLocal
    triton_args: list[str]
    answer: str
    truth: str


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def stack(model_repo: Path, mnist_heldout: tuple[np.ndarray, np.ndarray]) -> Iterator[Stack]:
    from clients.sdk import ImageClient
    from serving.triton_local import TritonLocal

    docs = kc.render(kc.K8S / "overlays" / "gpu", require_tool("kubectl"))
    (triton_container,) = kc.one(docs, "Deployment", "imgserve-triton")["spec"]["template"]["spec"]["containers"]
    triton_args = [a for a in triton_container["args"] if not a.startswith(TRITON_LOCAL_OWNS)]
    env = {k: v for k, v in kc.gateway_env(docs).items() if k.startswith("IMGSERVE_")}
    with TritonLocal(model_repo, startup_timeout_s=180, extra_args=triton_args) as triton:
        # The headless Service's name becomes "localhost" here: resolved by the gateway, not by gRPC.
        env.update(IMGSERVE_MODEL_REPOSITORY=str(model_repo), IMGSERVE_TRITON_URL=f"localhost:{triton.grpc_port}",
                   IMGSERVE_TRITON_RESOLVE_INTERVAL_S="1", IMGSERVE_SHUTDOWN_GRACE_S="2")
        (gateway_container,) = kc.one(docs, "Deployment", "imgserve")["spec"]["template"]["spec"]["containers"]
        assert gateway_container["args"] == ["serve"], "run_gateway runs `imgserve serve` with the env as its config"
        with run_gateway(model_repo, backend=env["IMGSERVE_BACKEND"], triton_url=env["IMGSERVE_TRITON_URL"],
                         env=env) as gateway:
            images, labels = mnist_heldout
            with ImageClient(gateway.grpc_target) as client:
                answer = client.classify(png(images[0]), model="lenet5", top_k=1)[0][0].label
                with pytest.raises(Exception):
                    client.classify(b"not an image", model="lenet5")   # an error, so errors_total has a sample
            yield Stack(docs, gateway, triton, triton_args, answer, str(labels[0]))


def test_gateway_classifies_through_triton_found_by_name(stack: Stack) -> None:
    assert stack.answer == stack.truth
    # the gateway resolved the name itself (DNS discovery), as it must for a headless Service
    log = stack.gateway.stderr()
    assert "Triton servers: added" in log and f"127.0.0.1:{stack.triton.grpc_port}" in log, log[-3000:]
    assert "--model-control-mode=explicit" in stack.triton_args and "--load-model=*" in stack.triton_args


def test_triton_loaded_the_repository_export_wrote(stack: Stack) -> None:
    index = json.loads(urllib.request.urlopen(urllib.request.Request(
        stack.triton.http_url + "/v2/repository/index", data=b"{}", method="POST"), timeout=10).read())
    assert {(m["name"], m.get("state")) for m in index} >= {("lenet5", "READY"), ("rgbnet", "READY")}


def gateway_port_for(docs: list[kc.Doc], gateway: GatewayProcess, manifest_port: int) -> tuple[str, int]:
    """("grpc"|"http", the test gateway's port) for a port number the manifests use."""
    from serving.settings import Settings

    env = kc.gateway_env(docs)   # a key the manifests leave out takes the gateway's default
    roles = {int(env.get("IMGSERVE_GRPC_PORT", Settings.grpc_port)): "grpc",
             int(env.get("IMGSERVE_HTTP_PORT", Settings.http_port)): "http"}
    if manifest_port not in roles:
        raise LookupError(f"port {manifest_port} is neither IMGSERVE_GRPC_PORT nor IMGSERVE_HTTP_PORT")
    role = roles[manifest_port]
    actual = gateway.grpc_target if role == "grpc" else gateway.http_url
    return role, int(actual.rsplit(":", 1)[1])


def probe_problems(docs: list[kc.Doc], stack: Stack) -> list[str]:
    """Each gateway probe, sent to the running gateway: HTTP probes must answer 200, gRPC ones SERVING.
    Triton probes go to triton-local, on the port the manifest's --http-port names."""
    problems = []
    for container, probe, path, port in kc.probes(docs):
        if container == "gateway":
            try:
                role, actual = gateway_port_for(docs, stack.gateway, port)
            except LookupError as exc:
                problems.append(f"gateway {probe}: {exc}")
                continue
            if path is None:
                if role != "grpc" or health_status(f"127.0.0.1:{actual}") != health_pb2.HealthCheckResponse.SERVING:
                    problems.append(f"gateway {probe}: gRPC health on {role} port is not SERVING")
            elif role != "http" or http_status(f"http://127.0.0.1:{actual}{path}") != 200:
                problems.append(f"gateway {probe}: GET {path} on the {role} port is not 200")
        elif container == "triton":
            if f"--http-port={port}" not in stack.triton_args + [a for a in kc.one(
                    docs, "Deployment", "imgserve-triton")["spec"]["template"]["spec"]["containers"][0]["args"]]:
                problems.append(f"triton {probe}: port {port} is not Triton's --http-port")
            if path is None or http_status(stack.triton.http_url + path) != 200:
                problems.append(f"triton {probe}: GET {path} is not 200")
    return problems


def test_probes_answer_on_the_running_gateway_and_triton(stack: Stack) -> None:
    assert kc.probes(stack.docs), "the overlay must have probes"
    assert probe_problems(stack.docs, stack) == []
    cpu = kc.render(kc.K8S / "overlays" / "cpu")
    assert probe_problems(cpu, stack) == []


def test_probe_check_catches_the_broken_fixture(stack: Stack) -> None:
    problems = probe_problems(kc.load(BROKEN / "objects.yaml"), stack)
    assert any("GET /ready" in p for p in problems), problems
    assert any("port 8081" in p for p in problems), problems


def exposed(stack: Stack) -> set[str]:
    gateway_page = fetch(stack.gateway.http_url + "/metrics")
    triton_page = fetch(stack.triton.metrics_url)
    return kc.exposed_metric_names(gateway_page) | kc.exposed_metric_names(triton_page)


def test_every_metric_the_manifests_name_is_exposed(stack: Stack) -> None:
    docs = stack.docs + kc.render(kc.K8S / "overlays" / "cpu")
    refs = kc.metric_references(docs)
    assert {"imgserve_request_duration_seconds_bucket", "imgserve_queue_wait_seconds_count",
            "nv_inference_queue_duration_us", "nv_inference_request_success"} <= set(refs)
    assert kc.missing_metrics(refs, exposed(stack)) == []


def test_metric_check_catches_the_broken_fixture(stack: Stack) -> None:
    refs = kc.metric_references(kc.load(BROKEN / "objects.yaml"))
    missing = kc.missing_metrics(refs, exposed(stack))
    assert any(m.startswith("imgserve_request_latency_seconds_bucket ") for m in missing), missing


def test_build_repository_job_args_are_accepted() -> None:
    from export.build_repo import parse_args

    (job,) = kc.load(kc.K8S / "jobs" / "build-repository.yaml")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "build-repo"
    parsed = parse_args(container["args"][1:])
    assert str(parsed.model_repository) == container["volumeMounts"][0]["mountPath"]
    with pytest.raises(SystemExit):
        parse_args(["--model-store", "/models"])    # the same parser rejects a wrong flag
