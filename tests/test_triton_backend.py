"""The Triton backend, end to end: real tritonserver processes, real gateways, no mocks.

* gateway -> Triton answers equal the embedded backend's (with and without 10-crop);
* specs read from Triton equal the specs read from disk;
* the raised gRPC message limits are really applied (a > 4 MiB call passes, and fails
  with a clear error when the limit is set below it);
* several Triton URLs: round-robin, failover on a dead server, readiness that follows
  Triton going away and coming back.
"""
from __future__ import annotations

import asyncio
import io
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from grpc_health.v1 import health_pb2
from PIL import Image

from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from clients.proto.imgserve.v1 import imgserve_pb2_grpc as pb_grpc
from serving.backends.triton import TritonBackend
from serving.errors import BackendError, BackendUnavailable, InvalidInput, ModelNotFound
from serving.repository import CONFIG_FILE, parse_config, scan_repository
from serving.triton_local import TritonLocal
from tests.procs import (GatewayProcess, health_status, refused_port, run_gateway, run_triton_local,
                         triton_settings)

pytestmark = [pytest.mark.triton, pytest.mark.slow]

NUM_CLASSES = 10
MiB = 1024 * 1024
CALL_TIMEOUT_S = 120.0      # generous: 2 shared cores
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)]
HEALTH_INTERVAL = "0.5"


# ---------------------------------------------------------------- helpers

def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def rgb_images(count: int, seed: int, sizes: tuple[tuple[int, int], ...] = ((72, 72), (90, 120), (130, 80))) -> list[bytes]:
    """Noise images of several sizes (so resize/crop paths differ) as PNG bytes."""
    rng = np.random.default_rng(seed)
    return [png(rng.integers(0, 256, size=(*sizes[i % len(sizes)], 3), dtype=np.uint8)) for i in range(count)]


def classify(target: str, model: str, images: list[bytes], *, ten_crop: bool,
             timeout_s: float = CALL_TIMEOUT_S) -> pb.ClassifyResponse:
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.ImageServiceStub(channel)
        return stub.Classify(pb.ClassifyRequest(model=model, images=images, top_k=NUM_CLASSES, ten_crop=ten_crop),
                             timeout=timeout_s)


def probabilities(response: pb.ClassifyResponse) -> np.ndarray:
    """[N, K] from top-K lists (top_k = K, so every class is present)."""
    out = np.full((len(response.results), NUM_CLASSES), np.nan, dtype=np.float32)
    for row, result in enumerate(response.results):
        for c in result.classes:
            out[row, c.index] = c.score
    assert not np.isnan(out).any()
    return out


def wait_for(predicate, timeout_s: float, what: str, step_s: float = 0.2) -> float:
    """Poll until predicate() is true; return the seconds it took."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        if predicate():
            return time.monotonic() - began
        time.sleep(step_s)
    raise AssertionError(f"{what} did not happen within {timeout_s:.0f}s")


def request_success(metrics_url: str, model: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    prefix = f'nv_inference_request_success{{model="{model}",'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def copy_model(src_repo: Path, dst_repo: Path, src: str, dst: str, max_batch_size: int) -> None:
    """Copy a model under a new name with another max_batch_size (config rewritten through the proto)."""
    target = dst_repo / dst
    shutil.copytree(src_repo / src, target)
    cfg = parse_config((target / CONFIG_FILE).read_text())
    cfg.name = dst
    cfg.max_batch_size = max_batch_size
    (target / CONFIG_FILE).write_text(text_format.MessageToString(cfg))


def ort_probs(onnx_path: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"image": batch})[0]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def triton(model_repo: Path) -> Iterator[TritonLocal]:
    with run_triton_local(model_repo) as server:
        yield server


@pytest.fixture(scope="module")
def embedded_gw(model_repo: Path) -> Iterator[GatewayProcess]:
    with run_gateway(model_repo, extra_args=["--preprocess-threads", "1", "--backend-threads", "1"]) as gw:
        yield gw


@pytest.fixture(scope="module")
def triton_gw(model_repo: Path, triton: TritonLocal) -> Iterator[GatewayProcess]:
    with run_gateway(model_repo, backend="triton", triton_url=triton.grpc_url,
                     extra_args=["--preprocess-threads", "1", "--triton-health-interval-s", HEALTH_INTERVAL]) as gw:
        yield gw


@pytest.fixture(scope="module")
def variants(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """lenet5 with max_batch_size 8192 (one call can exceed 4 MiB) and lenet5_mb4 (max 4: forces chunking)."""
    repo = tmp_path_factory.mktemp("triton_variants")
    copy_model(model_repo, repo, "lenet5", "lenet5", 8192)
    copy_model(model_repo, repo, "lenet5", "lenet5_mb4", 4)
    return repo


# ---------------------------------------------------------------- gateway -> Triton equals embedded

def test_list_models_equal(embedded_gw: GatewayProcess, triton_gw: GatewayProcess) -> None:
    def models(target: str) -> list[pb.ModelInfo]:
        with grpc.insecure_channel(target) as channel:
            return list(pb_grpc.ImageServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=30).models)
    via_triton = models(triton_gw.grpc_target)
    assert [m.name for m in via_triton] == ["lenet5", "rgbnet"]
    assert via_triton == models(embedded_gw.grpc_target)
    assert all(m.ready for m in via_triton)


@pytest.mark.parametrize("ten_crop", [False, True], ids=["single", "ten_crop"])
@pytest.mark.parametrize("model", ["lenet5", "rgbnet"])
def test_classify_equals_embedded(model: str, ten_crop: bool, embedded_gw: GatewayProcess,
                                  triton_gw: GatewayProcess, mnist_heldout: tuple[np.ndarray, np.ndarray]) -> None:
    if model == "lenet5":
        images = [png(img) for img in mnist_heldout[0][:12]]
    else:
        images = rgb_images(7, seed=3)
    want = classify(embedded_gw.grpc_target, model, images, ten_crop=ten_crop)
    got = classify(triton_gw.grpc_target, model, images, ten_crop=ten_crop)
    assert got.model == want.model == model and got.model_version == want.model_version
    assert got.ten_crop is ten_crop and want.ten_crop is ten_crop
    assert [r.classes[0].index for r in got.results] == [r.classes[0].index for r in want.results]
    assert [r.classes[0].label for r in got.results] == [r.classes[0].label for r in want.results]
    np.testing.assert_allclose(probabilities(got), probabilities(want), atol=1e-5, rtol=0)


def test_big_ten_crop_request(embedded_gw: GatewayProcess, triton_gw: GatewayProcess) -> None:
    """> 4 MiB of images, 10-crop: 240 crops through Triton, same answers as embedded."""
    images = rgb_images(24, seed=4, sizes=((256, 256),))
    assert sum(map(len, images)) > 4 * MiB
    got = classify(triton_gw.grpc_target, "rgbnet", images, ten_crop=True)
    want = classify(embedded_gw.grpc_target, "rgbnet", images, ten_crop=True)
    assert len(got.results) == 24
    np.testing.assert_allclose(probabilities(got), probabilities(want), atol=1e-5, rtol=0)


def test_dead_url_in_the_list_still_serves(model_repo: Path, triton: TritonLocal) -> None:
    with refused_port() as port, run_gateway(
            model_repo, backend="triton", triton_url=f"127.0.0.1:{port},{triton.grpc_url}",
            extra_args=["--preprocess-threads", "1", "--triton-health-interval-s", HEALTH_INTERVAL]) as gw:
        images = [png(np.full((28, 28), 255 * (i % 2), np.uint8)) for i in range(4)]
        for _ in range(6):
            response = classify(gw.grpc_target, "lenet5", images, ten_crop=False)
            assert len(response.results) == 4
        assert health_status(gw.grpc_target) == health_pb2.HealthCheckResponse.SERVING


# ---------------------------------------------------------------- the backend in-process

async def test_specs_from_triton_equal_specs_from_disk(triton: TritonLocal, model_repo: Path,
                                                       tmp_path: Path) -> None:
    backend = TritonBackend(triton_settings(triton.grpc_url, model_repo))
    await backend.start()
    try:
        assert await backend.ready()
        from_triton = await backend.models()
        from_disk = {name: local.spec for name, local in scan_repository(model_repo).items()}
        assert from_triton == from_disk
        assert from_triton["rgbnet"].extra == from_disk["rgbnet"].extra
    finally:
        await backend.close()
    # Without a local copy of the repository, labels fall back to class indices.
    bare = TritonBackend(triton_settings(triton.grpc_url, tmp_path / "absent"))
    await bare.start()
    try:
        specs = await bare.models()
        assert specs["rgbnet"].labels == tuple(str(i) for i in range(NUM_CLASSES))
        assert specs["rgbnet"].preprocess == from_disk["rgbnet"].preprocess
    finally:
        await bare.close()


async def test_errors_are_typed(triton: TritonLocal, model_repo: Path) -> None:
    backend = TritonBackend(triton_settings(triton.grpc_url, model_repo))
    await backend.start()
    try:
        batch = np.zeros((2, 64, 64, 3), np.uint8)
        with pytest.raises(ModelNotFound):
            await backend.infer("no_such_model", batch)
        with pytest.raises(InvalidInput, match="uint8"):
            await backend.infer("rgbnet", batch.astype(np.float32))
        with pytest.raises(InvalidInput, match="shape"):
            await backend.infer("rgbnet", np.zeros((2, 28, 28, 1), np.uint8))
        out = (await backend.infer("rgbnet", batch))["probabilities"]
        assert out.dtype == np.float32 and out.shape == (2, NUM_CLASSES)
    finally:
        await backend.close()


async def test_raised_message_limits(variants: Path) -> None:
    """One 6000-crop call is ~4.5 MiB of uint8: it passes at 64 MiB and fails clearly at 4 MiB."""
    batch = np.random.default_rng(5).integers(0, 256, size=(6000, 28, 28, 1), dtype=np.uint8)
    assert batch.nbytes > 4 * MiB
    with run_triton_local(variants) as server:
        roomy = TritonBackend(triton_settings(server.grpc_url, variants))
        tight = TritonBackend(triton_settings(server.grpc_url, variants, max_message_mb=4))
        await roomy.start()
        await tight.start()
        try:
            out = (await roomy.infer("lenet5", batch))["probabilities"]
            np.testing.assert_allclose(out, ort_probs(variants / "lenet5" / "1" / "model.onnx", batch),
                                       atol=1e-5, rtol=0)
            with pytest.raises(BackendError, match="max_message_mb"):
                await tight.infer("lenet5", batch)
            assert await tight.ready(), "a too-big message must not mark the server unhealthy"
        finally:
            await roomy.close()
            await tight.close()


async def test_round_robin_chunking_and_failover(variants: Path) -> None:
    onnx_path = variants / "lenet5_mb4" / "1" / "model.onnx"
    batch = np.random.default_rng(6).integers(0, 256, size=(40, 28, 28, 1), dtype=np.uint8)
    want = ort_probs(onnx_path, batch)
    with run_triton_local(variants) as a, run_triton_local(variants) as b:
        # A long health interval: only failed calls can change a server's health in this test.
        backend = TritonBackend(triton_settings(f"{a.grpc_url},{b.grpc_url}", variants,
                                                triton_health_interval_s=600.0))
        await backend.start()
        try:
            before = (request_success(a.metrics_url, "lenet5_mb4"), request_success(b.metrics_url, "lenet5_mb4"))
            out = (await backend.infer("lenet5_mb4", batch))["probabilities"]   # 10 chunks of max_batch_size 4
            np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)
            served = (request_success(a.metrics_url, "lenet5_mb4") - before[0],
                      request_success(b.metrics_url, "lenet5_mb4") - before[1])
            assert served == (5, 5), f"round-robin expected, got {served}"

            b.stop()                                             # one server goes away
            before_a = request_success(a.metrics_url, "lenet5_mb4")
            for _ in range(4):                                   # every call succeeds: retried on a
                np.testing.assert_allclose((await backend.infer("lenet5_mb4", batch[:4]))["probabilities"], want[:4],
                                           atol=1e-5)
            assert request_success(a.metrics_url, "lenet5_mb4") - before_a == 4
            health = {s.url: s.healthy for s in backend.servers()}
            assert health == {a.grpc_url: True, b.grpc_url: False}, "the failed call marks b unhealthy"
            assert await backend.ready()

            a.stop()                                             # all servers gone
            # Fails fast: a call that hung would end at the call timeout as DeadlineExceeded instead.
            with pytest.raises(BackendUnavailable):
                await backend.infer("lenet5_mb4", batch[:4])
            assert not await backend.ready()
            assert not await backend.model_ready("lenet5_mb4")
            with pytest.raises(BackendUnavailable, match="no healthy Triton server"):
                await backend.infer("lenet5_mb4", batch[:4])
        finally:
            await backend.close()


async def test_health_loop_notices_a_dead_server(variants: Path) -> None:
    with run_triton_local(variants) as server:
        backend = TritonBackend(triton_settings(server.grpc_url, variants, triton_health_interval_s=0.2))
        await backend.start()
        try:
            assert await backend.ready()
            server.stop()
            began = time.monotonic()
            while await backend.ready():   # the bound only turns a hang into a failure (probes run every 0.2 s)
                assert time.monotonic() - began < 120.0, "health loop did not notice Triton went away"
                await asyncio.sleep(0.05)
            assert backend.servers()[0].last_error
        finally:
            await backend.close()


async def test_start_fails_clearly_without_triton(model_repo: Path) -> None:
    with refused_port() as port:
        backend = TritonBackend(triton_settings(f"127.0.0.1:{port}", model_repo))
        with pytest.raises(BackendUnavailable, match="no Triton server is ready"):
            await backend.start()


# ---------------------------------------------------------------- gateway readiness follows Triton

def test_gateway_readiness_follows_triton(model_repo: Path, variants: Path) -> None:
    images = [png(np.zeros((28, 28), np.uint8))]
    first = TritonLocal(variants, startup_timeout_s=180)
    first.start()
    try:
        with run_gateway(model_repo, backend="triton", triton_url=first.grpc_url,
                         extra_args=["--preprocess-threads", "1", "--triton-health-interval-s", HEALTH_INTERVAL]) as gw:
            assert len(classify(gw.grpc_target, "lenet5", images, ten_crop=False).results) == 1

            first.stop()
            wait_for(lambda: health_status(gw.grpc_target) == health_pb2.HealthCheckResponse.NOT_SERVING,
                     120, "gateway health NOT_SERVING after Triton stopped")
            # Fails fast: a request that hung on the missing Triton would end DEADLINE_EXCEEDED instead.
            with pytest.raises(grpc.RpcError) as info:
                classify(gw.grpc_target, "lenet5", images, ten_crop=False, timeout_s=60)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()

            # Triton comes back on the same port: the gateway serves again without a restart.
            second = TritonLocal(variants, grpc_port=int(first.grpc_url.rsplit(":", 1)[1]), startup_timeout_s=180)
            with second:
                wait_for(lambda: health_status(gw.grpc_target) == health_pb2.HealthCheckResponse.SERVING,
                         120, "gateway health SERVING after Triton came back")
                assert len(classify(gw.grpc_target, "lenet5", images, ten_crop=False).results) == 1
    finally:
        first.stop()

