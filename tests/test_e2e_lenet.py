"""Issue #2's end-to-end test: every held-out MNIST digit through the real gateway, over gRPC and HTTP.

The gateway runs as a real ``imgserve serve`` process on the exported repository.
Each digit travels as PNG bytes; the answers must equal what onnxruntime says
about the same ONNX file offline, image by image, and both transports must agree.
"""
from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest
from PIL import Image

from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from clients.proto.imgserve.v1 import imgserve_pb2_grpc as pb_grpc
from tests.procs import GatewayProcess, run_gateway

pytestmark = pytest.mark.slow

BATCH = 32
CONCURRENCY = 8
NUM_CLASSES = 10


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def batches(items: list[bytes], size: int) -> list[list[bytes]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def scores_matrix(results: list[list[tuple[int, float]]]) -> np.ndarray:
    """[N, K] probabilities rebuilt from top-K (index, score) lists."""
    out = np.full((len(results), NUM_CLASSES), np.nan, dtype=np.float32)
    for row, classes in enumerate(results):
        for index, score in classes:
            out[row, index] = score
    return out


@pytest.fixture(scope="module")
def gateway(model_repo: Path) -> Iterator[GatewayProcess]:
    with run_gateway(model_repo, extra_args=["--preprocess-threads", "1", "--backend-threads", "1"]) as gw:
        yield gw


@pytest.fixture(scope="module")
def digit_pngs(mnist_heldout: tuple[np.ndarray, np.ndarray]) -> list[bytes]:
    images, _ = mnist_heldout
    return [png(img) for img in images]


async def classify_grpc(target: str, pngs: list[bytes]) -> list[list[tuple[int, float]]]:
    """All images through imgserve.v1 Classify (raw stub), batches of 32, 8 requests in flight."""
    limit = asyncio.Semaphore(CONCURRENCY)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ImageServiceStub(channel)

        async def one(chunk: list[bytes]) -> pb.ClassifyResponse:
            async with limit:
                return await stub.Classify(pb.ClassifyRequest(model="lenet5", images=chunk, top_k=NUM_CLASSES),
                                           timeout=60)

        responses = await asyncio.gather(*(one(c) for c in batches(pngs, BATCH)))
    out: list[list[tuple[int, float]]] = []
    for response in responses:
        assert response.model == "lenet5" and response.model_version and not response.ten_crop
        out += [[(c.index, c.score) for c in r.classes] for r in response.results]
    return out


async def classify_http(url: str, pngs: list[bytes]) -> list[list[tuple[int, float]]]:
    """All images through POST /v1/classify (proto3 JSON, base64 images), same batching."""
    limit = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession() as session:

        async def one(chunk: list[bytes]) -> dict:
            body = {"model": "lenet5", "images": [base64.b64encode(b).decode() for b in chunk], "topK": NUM_CLASSES}
            async with limit, session.post(f"{url}/v1/classify", json=body) as resp:
                assert resp.status == 200, await resp.text()
                return await resp.json()

        docs = await asyncio.gather(*(one(c) for c in batches(pngs, BATCH)))
    out: list[list[tuple[int, float]]] = []
    for doc in docs:
        assert doc["model"] == "lenet5"
        out += [[(c["index"], c["score"]) for c in r["classes"]] for r in doc["results"]]
    return out


async def test_every_heldout_digit_matches_offline_over_both_transports(
        gateway: GatewayProcess, digit_pngs: list[bytes], mnist_heldout: tuple[np.ndarray, np.ndarray],
        lenet_offline_predictions) -> None:
    _, labels = mnist_heldout
    offline = lenet_offline_predictions
    via_grpc, via_http = await asyncio.gather(classify_grpc(gateway.grpc_target, digit_pngs),
                                              classify_http(gateway.http_url, digit_pngs))
    assert len(via_grpc) == len(via_http) == len(labels)

    for name, results in (("grpc", via_grpc), ("http", via_http)):
        top1 = np.array([r[0][0] for r in results])
        mismatches = np.flatnonzero(top1 != offline.classes)
        assert mismatches.size == 0, f"{name}: {mismatches.size} images differ from offline, first {mismatches[:10]}"
        accuracy = float((top1 == labels).mean())
        assert accuracy >= 0.96, f"{name}: accuracy {accuracy:.4f}"
        # results are best first and cover every class
        for classes in results[:50]:
            scores = [s for _, s in classes]
            assert scores == sorted(scores, reverse=True) and len(classes) == NUM_CLASSES
        probs = scores_matrix(results)
        np.testing.assert_allclose(probs, offline.probabilities, atol=1e-5, err_msg=name)

    grpc_top1 = [r[0][0] for r in via_grpc]
    http_top1 = [r[0][0] for r in via_http]
    assert grpc_top1 == http_top1
    np.testing.assert_allclose(scores_matrix(via_grpc), scores_matrix(via_http), rtol=0, atol=1e-6)
    assert gateway.alive()


def lenet_batches(http_url: str) -> tuple[float, float]:
    """(backend calls, crops) the gateway has sent to lenet5 so far, from its /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{http_url}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    found = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
             if s.name in ("imgserve_batch_size_count", "imgserve_batch_size_sum") and s.labels.get("model") == "lenet5"}
    return found.get("imgserve_batch_size_count", 0.0), found.get("imgserve_batch_size_sum", 0.0)


async def test_sequential_single_image_requests_each_make_one_backend_call(
        gateway: GatewayProcess, digit_pngs: list[bytes], lenet_offline_predictions) -> None:
    """One digit at a time over both transports: every answer is the offline one, and each request is
    exactly one backend call of one crop (a lone request is dispatched, not held for company).
    How long that takes is a benchmark figure: `imgserve bench --concurrency 1` measures it."""
    rounds = 10
    want = [int(c) for c in lenet_offline_predictions.classes[:rounds]]
    calls_before, crops_before = lenet_batches(gateway.http_url)
    got_grpc: list[int] = []
    async with grpc.aio.insecure_channel(gateway.grpc_target) as channel:
        stub = pb_grpc.ImageServiceStub(channel)
        for image in digit_pngs[:rounds]:
            response = await stub.Classify(pb.ClassifyRequest(model="lenet5", images=[image], top_k=1), timeout=60)
            got_grpc.append(response.results[0].classes[0].index)
    got_http: list[int] = []
    async with aiohttp.ClientSession() as session:
        for image in digit_pngs[:rounds]:
            body = {"model": "lenet5", "images": [base64.b64encode(image).decode()], "topK": 1}
            async with session.post(f"{gateway.http_url}/v1/classify", json=body,
                                    timeout=aiohttp.ClientTimeout(total=60)) as resp:
                assert resp.status == 200, await resp.text()
                got_http.append((await resp.json())["results"][0]["classes"][0]["index"])
    assert got_grpc == got_http == want
    calls_after, crops_after = lenet_batches(gateway.http_url)
    assert (calls_after - calls_before, crops_after - crops_before) == (2 * rounds, 2 * rounds)
