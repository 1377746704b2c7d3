"""gRPC health checking, server reflection, HTTP health endpoints and graceful SIGTERM."""
from __future__ import annotations

import io
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from clients.proto.imgserve.v1 import imgserve_pb2_grpc as pb_grpc
from tests.procs import GatewayProcess, run_gateway

V1 = "imgserve.v1.ImageService"
V2 = "inference.GRPCInferenceService"


def png(size: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture(scope="module")
def gateway(model_repo: Path) -> Iterator[GatewayProcess]:
    with run_gateway(model_repo, extra_args=["--preprocess-threads", "1", "--backend-threads", "1"]) as gw:
        yield gw


@pytest.mark.parametrize("service", ["", V1, V2])
def test_health_serving_overall_and_per_service(gateway: GatewayProcess, service: str) -> None:
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_health_unknown_service_is_not_found(gateway: GatewayProcess) -> None:
    with grpc.insecure_channel(gateway.grpc_target) as channel, pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_both_apis(gateway: GatewayProcess) -> None:
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {V1, V2, "grpc.health.v1.Health"} <= services
        pool = DescriptorPool(database)
        v1 = pool.FindServiceByName(V1)
        assert {m.name for m in v1.methods} == {"Classify", "Detect", "Segment", "ListModels"}
        assert v1.methods_by_name["Classify"].input_type.fields_by_name["top_k"].has_presence
        v2 = pool.FindServiceByName(V2)
        assert {"ModelInfer", "ModelMetadata", "ServerLive", "ModelConfig"} <= {m.name for m in v2.methods}


def test_http_health_endpoints(gateway: GatewayProcess) -> None:
    assert http_get(f"{gateway.http_url}/healthz") == (200, b'{"status":"live"}')
    status, body = http_get(f"{gateway.http_url}/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    assert http_get(f"{gateway.http_url}/v2/health/live")[0] == 200
    assert http_get(f"{gateway.http_url}/v2/health/ready")[0] == 200


def in_flight(gw: GatewayProcess, endpoint: str) -> float:
    _, body = http_get(f"{gw.http_url}/metrics")
    for line in body.decode().splitlines():
        if line.startswith(f'imgserve_requests_in_flight{{endpoint="{endpoint}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_and_exits_zero(model_repo: Path) -> None:
    """Slow 10-crop requests are in flight when SIGTERM arrives: all complete, then exit code 0."""
    images = [png(96, seed) for seed in range(8)]
    with run_gateway(model_repo, extra_args=["--preprocess-threads", "1", "--backend-threads", "1",
                                             "--shutdown-grace-s", "60"]) as gw:
        results: list[object] = []
        with grpc.insecure_channel(gw.grpc_target) as channel:
            stub = pb_grpc.ImageServiceStub(channel)
            request = pb.ClassifyRequest(model="rgbnet", images=images, ten_crop=True)

            def call() -> None:
                try:
                    results.append(stub.Classify(request, timeout=120))
                except grpc.RpcError as err:
                    results.append(err)

            threads = [threading.Thread(target=call) for _ in range(4)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 120   # only turns a hang into a failure
            while in_flight(gw, "grpc.Classify") < 4:
                assert time.monotonic() < deadline, "requests never got in flight"
                time.sleep(0.02)
            gw.proc.send_signal(signal.SIGTERM)
            for t in threads:
                t.join(timeout=90)
            code = gw.proc.wait(timeout=120)
        assert code == 0, gw.stderr()[-3000:]
        # Drained because the requests finished, not because the 60 s grace ran out:
        # nothing had to be failed or cut off (the log says so when it happens).
        log = gw.stderr()
        assert "failing them" not in log and "drain timed out" not in log, log[-3000:]
        assert len(results) == 4
        for result in results:
            assert isinstance(result, pb.ClassifyResponse), f"in-flight request failed: {result}"
            assert len(result.results) == len(images) and result.ten_crop
        assert "draining" in gw.stderr()
        # the listeners are gone: a new request cannot connect
        with grpc.insecure_channel(gw.grpc_target) as channel, pytest.raises(grpc.RpcError) as info:
            pb_grpc.ImageServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_sigterm_when_idle_exits_without_waiting_for_the_grace(model_repo: Path) -> None:
    """An hour of grace: an idle gateway that waited for it would never exit within stop()'s wait."""
    with run_gateway(model_repo, extra_args=["--backend-threads", "1", "--shutdown-grace-s", "3600"]) as gw:
        code = gw.stop(timeout_s=120)   # generous for a loaded machine; far below the grace
        assert code == 0, gw.stderr()[-3000:]
        assert "stopped" in gw.stderr()
