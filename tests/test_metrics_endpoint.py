"""/metrics after real traffic: the brief's metric names, observations, errors by code, batching, promtool."""
from __future__ import annotations

import asyncio
import io
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from clients.proto.imgserve.v1 import imgserve_pb2_grpc as pb_grpc
from tests.procs import GatewayProcess, run_gateway
from tests.requirements import require_tool

HISTOGRAMS = ("imgserve_request_duration_seconds", "imgserve_queue_wait_seconds",
              "imgserve_preprocess_duration_seconds", "imgserve_backend_duration_seconds", "imgserve_batch_size")
CONCURRENT = 24
BATCH = 8
ROUNDS = 4


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(28, 28), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def scrape(gw: GatewayProcess) -> str:
    with urllib.request.urlopen(f"{gw.http_url}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return resp.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(table: dict, name: str, **labels: str) -> float | None:
    return table.get((name, tuple(sorted(labels.items()))))


async def burst(target: str, rounds: int) -> None:
    """CONCURRENT single-image requests at once, several times: the batcher should merge them."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ImageServiceStub(channel)
        for r in range(rounds):
            await asyncio.gather(*(stub.Classify(pb.ClassifyRequest(model="lenet5", images=[png(r * 100 + i)]),
                                                 timeout=30) for i in range(CONCURRENT)))


@pytest.fixture(scope="module")
def gateway(model_repo: Path) -> Iterator[GatewayProcess]:
    # Batches of at most 8. An idle backend takes a request at once (no idle wait, docs/batching.md),
    # so how requests merge depends on timing here; the tests below check the accounting, and the
    # merging itself is proven where a backend can be held (tests/test_dataplane.py, test_batcher.py).
    args = ["--max-batch-size", str(BATCH), "--max-queue-delay-ms", "600000", "--preprocess-threads", "1",
            "--backend-threads", "1"]
    with run_gateway(model_repo, extra_args=args) as gw:
        yield gw


@pytest.fixture(scope="module")
def after_traffic(gateway: GatewayProcess) -> str:
    asyncio.run(burst(gateway.grpc_target, rounds=ROUNDS))
    with grpc.insecure_channel(gateway.grpc_target) as channel, pytest.raises(grpc.RpcError):
        pb_grpc.ImageServiceStub(channel).Classify(pb.ClassifyRequest(model="missing", images=[png(0)]), timeout=10)
    return settled_scrape(gateway)


def settled_scrape(gw: GatewayProcess, timeout_s: float = 60.0) -> str:
    """A scrape once no request is in flight.

    A handler records its request as it returns, which can be a moment after the client
    has its answer (gRPC sends an error status before the handler unwinds), so on a
    busy machine an immediate scrape may still count the last call as in flight.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        text = scrape(gw)
        busy = [v for (name, _), v in samples(text).items() if name == "imgserve_requests_in_flight" and v]
        if not busy or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def test_histograms_have_observations(after_traffic: str) -> None:
    table = samples(after_traffic)
    requests = value(table, "imgserve_request_duration_seconds_count", model="lenet5", endpoint="grpc.Classify",
                     code="OK")
    assert requests == ROUNDS * CONCURRENT
    for name in HISTOGRAMS:
        counts = [v for (n, _), v in table.items() if n == f"{name}_count"]
        assert counts and sum(counts) > 0, f"{name} has no observations"
    assert value(table, "imgserve_queue_wait_seconds_count", model="lenet5") >= ROUNDS * CONCURRENT
    assert value(table, "imgserve_backend_duration_seconds_count", model="lenet5", backend="onnxruntime") >= 1
    assert value(table, "imgserve_backend_up", backend="onnxruntime") == 1.0
    assert value(table, "imgserve_queue_depth", model="lenet5") == 0.0


def test_in_flight_gauge_is_exported_and_settles(after_traffic: str) -> None:
    table = samples(after_traffic)
    assert value(table, "imgserve_requests_in_flight", endpoint="grpc.Classify") == 0.0


def test_errors_by_code(after_traffic: str) -> None:
    table = samples(after_traffic)
    assert value(table, "imgserve_request_errors_total", model="(unknown)", endpoint="grpc.Classify",
                 code="NOT_FOUND") == 1.0
    assert not any(dict(labels).get("model") == "missing" for _, labels in table), "client text became a label"
    assert value(table, "imgserve_request_errors_total", model="lenet5", endpoint="grpc.Classify",
                 code="OK") is None


def test_batch_size_histogram_accounts_for_every_crop(after_traffic: str) -> None:
    table = samples(after_traffic)
    calls = value(table, "imgserve_batch_size_count", model="lenet5")
    crops = value(table, "imgserve_batch_size_sum", model="lenet5")
    assert crops == ROUNDS * CONCURRENT                      # every crop counted once
    assert 1 <= calls <= crops
    assert value(table, "imgserve_batch_size_bucket", model="lenet5", le=f"{float(BATCH)}") == calls  # none above 8
    assert value(table, "imgserve_backend_duration_seconds_count", model="lenet5", backend="onnxruntime") == calls


def test_promtool_accepts_the_exposition(after_traffic: str) -> None:
    promtool = require_tool("promtool", "`make tools` installs it from apt `prometheus`")
    result = subprocess.run([promtool, "check", "metrics"], input=after_traffic.encode(), capture_output=True,
                            timeout=60)
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 0 and not output.strip(), output


def test_openmetrics_on_request(gateway: GatewayProcess, after_traffic: str) -> None:
    request = urllib.request.Request(f"{gateway.http_url}/metrics",
                                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        assert resp.read().decode().rstrip().endswith("# EOF")
