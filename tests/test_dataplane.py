"""The data plane in process, on the embedded ONNX Runtime backend and the real test repository."""
from __future__ import annotations

import asyncio
import io
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.backends.onnxruntime import OnnxRuntimeBackend
from serving.dataplane import ClassifyResult, DataPlane, ProbabilitiesResult
from serving.errors import BackendUnavailable, DeadlineExceeded, InvalidInput, ModelNotFound
from serving.metrics import Metrics
from serving.settings import Settings



def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def photo_jpeg(width: int = 1024, height: int = 768) -> bytes:
    from sklearn.datasets import load_sample_image

    buf = io.BytesIO()
    Image.fromarray(load_sample_image("flower.jpg")).resize((width, height)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def only(repo: Path, tmp_path: Path, *models: str) -> Path:
    """A repository view holding just ``models`` (symlinks), so a test loads only what it uses."""
    view = Path(tempfile.mkdtemp(prefix="repo", dir=tmp_path))
    for name in models:
        (view / name).symlink_to(repo / name, target_is_directory=True)
    return view


class HeldBackend(OnnxRuntimeBackend):
    """The real backend, whose calls wait while ``go`` is clear: tests make work queue behind a busy slot
    (an idle backend takes every item at once, so only a busy one lets a queue form)."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.go = asyncio.Event()
        self.go.set()
        self.entered = 0

    async def infer(self, model: str, batch: np.ndarray) -> dict[str, np.ndarray]:
        self.entered += 1
        await self.go.wait()
        return await super().infer(model, batch)


async def until(predicate, what: str, timeout_s: float = 60.0) -> None:
    """Poll; the timeout only turns a hang into a clear failure."""
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


@asynccontextmanager
async def running(repo: Path, backend: type[OnnxRuntimeBackend] = OnnxRuntimeBackend,
                  **overrides: object) -> AsyncIterator[DataPlane]:
    settings = Settings(model_repository=repo, backend_threads=1, preprocess_threads=2, **overrides)
    plane = DataPlane(settings, backend(settings), Metrics())
    await plane.start()
    try:
        yield plane
    finally:
        await plane.stop()


async def test_lenet_classifies_heldout_digits(model_repo: Path, tmp_path: Path, mnist_heldout, lenet_offline_predictions) -> None:
    images, labels = mnist_heldout
    n = 200
    encoded = [png(img) for img in images[:n]]
    async with running(only(model_repo, tmp_path, "lenet5")) as plane:
        # several concurrent requests of up to 64 images, like real clients
        parts = await asyncio.gather(*(plane.probabilities("lenet5", encoded[i:i + 50]) for i in range(0, n, 50)))
        top = await plane.classify("lenet5", encoded[:8], top_k=3)
    probs = np.concatenate([p.probabilities for p in parts])
    assert probs.shape == (n, 10) and probs.dtype == np.float32
    predicted = probs.argmax(axis=1)
    assert (predicted == labels[:n]).mean() >= 0.95
    # identical to running the exported ONNX file directly on the raw digits
    np.testing.assert_array_equal(predicted, lenet_offline_predictions.classes[:n])
    np.testing.assert_allclose(probs, lenet_offline_predictions.probabilities[:n], atol=1e-5)
    assert isinstance(top, ClassifyResult) and top.model == "lenet5" and top.version == "1" and not top.ten_crop
    for scores, label in zip(top.results, labels[:8]):
        assert len(scores) == 3
        assert scores[0].score >= scores[1].score >= scores[2].score
        assert scores[0].label == str(scores[0].index)
    assert [s[0].index for s in top.results] == list(lenet_offline_predictions.classes[:8])


async def test_models_listing_and_lookup(model_repo: Path) -> None:
    async with running(model_repo) as plane:
        assert await plane.ready()
        statuses = await plane.list_models()
        assert [s.spec.name for s in statuses] == ["lenet5", "rgbnet"]
        assert all(s.ready for s in statuses)
        rgb = await plane.get_model("rgbnet")
        assert rgb.spec.preprocess.resize == 72 and rgb.spec.preprocess.crop == 64
        with pytest.raises(ModelNotFound, match="available models: lenet5, rgbnet"):
            await plane.get_model("alexnet")
        with pytest.raises(ModelNotFound):
            await plane.classify("alexnet", [png(np.zeros((28, 28), np.uint8))])
        assert plane.metrics.sample("imgserve_backend_up", {"backend": "onnxruntime"}) == 1
    assert plane.metrics.sample("imgserve_backend_up", {"backend": "onnxruntime"}) == 0


async def test_request_validation(model_repo: Path, tmp_path: Path) -> None:
    digit = png(np.zeros((28, 28), np.uint8))
    async with running(only(model_repo, tmp_path, "lenet5"), max_images_per_request=3, default_top_k=4) as plane:
        for bad in (0, -1, True, 2.5):
            with pytest.raises(InvalidInput, match="top_k"):
                await plane.classify("lenet5", [digit], top_k=bad)
        assert len((await plane.classify("lenet5", [digit], top_k=1000)).results[0]) == 10   # clamped
        assert len((await plane.classify("lenet5", [digit])).results[0]) == 4                # the default
        with pytest.raises(InvalidInput, match="no images"):
            await plane.classify("lenet5", [])
        with pytest.raises(InvalidInput, match="4 images in one request; the limit is 3"):
            await plane.classify("lenet5", [digit] * 4)
        with pytest.raises(InvalidInput, match="image 1: expected encoded image bytes"):
            await plane.classify("lenet5", [digit, "not bytes"])  # type: ignore[list-item]
        with pytest.raises(InvalidInput, match="image 1: not a recognised image"):
            await plane.classify("lenet5", [digit, b"GIF89a? no", digit])
        with pytest.raises(InvalidInput, match="image 2: empty"):
            await plane.classify("lenet5", [digit, digit, b""])
        # the plane still serves after bad requests
        assert (await plane.probabilities("lenet5", [digit])).probabilities.shape == (1, 10)


async def test_ten_crop_defaults_and_shapes(model_repo: Path, tmp_path: Path) -> None:
    data = photo_jpeg(320, 240)
    async with running(only(model_repo, tmp_path, "rgbnet")) as plane:
        default = await plane.probabilities("rgbnet", [data, data])
        ten = await plane.probabilities("rgbnet", [data, data], ten_crop=True)
    assert isinstance(default, ProbabilitiesResult)
    assert default.ten_crop is False            # rgbnet's ten_crop_default
    assert ten.ten_crop is True
    for result in (default, ten):
        assert result.probabilities.shape == (2, 10) and result.probabilities.dtype == np.float32
        np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(result.probabilities[0], result.probabilities[1])
    # different crops, different answer (compared in log space: the random-weight rgbnet is very confident)
    tiny = np.finfo(np.float32).tiny
    shift = np.abs(np.log(np.maximum(default.probabilities, tiny)) - np.log(np.maximum(ten.probabilities, tiny)))
    assert shift.max() > 0.1


async def test_concurrent_requests_share_backend_calls(model_repo: Path, tmp_path: Path) -> None:
    data = photo_jpeg(160, 120)
    # The first request finds the backend idle and goes alone, at once; its call is held, so the 24
    # requests that follow queue behind it and leave as three full batches of 8 when it returns.
    async with running(only(model_repo, tmp_path, "rgbnet"), HeldBackend, max_batch_size=8) as plane:
        backend = plane.backend
        assert isinstance(backend, HeldBackend)
        backend.go.clear()
        first = asyncio.create_task(plane.probabilities("rgbnet", [data]))
        await until(lambda: backend.entered == 1, "the first call")
        rest = [asyncio.create_task(plane.probabilities("rgbnet", [data])) for _ in range(24)]
        await until(lambda: plane.metrics.sample("imgserve_queue_depth", {"model": "rgbnet"}) == 24, "24 queued")
        backend.go.set()
        results = await asyncio.gather(first, *rest)
        m = plane.metrics
    assert all(np.array_equal(r.probabilities, results[0].probabilities) for r in results[1:]) or \
        all(np.allclose(r.probabilities, results[0].probabilities, atol=1e-5) for r in results[1:])
    labels = {"model": "rgbnet"}
    calls = m.sample("imgserve_batch_size_count", labels)
    crops = m.sample("imgserve_batch_size_sum", labels)
    assert crops == 25
    assert calls == 4, f"{calls} backend calls for 1 + 24 concurrent single-image requests"
    assert m.sample("imgserve_batch_size_bucket", {"model": "rgbnet", "le": "1.0"}) == 1     # only the first
    assert m.sample("imgserve_preprocess_duration_seconds_count", labels) == 25
    assert m.sample("imgserve_queue_wait_seconds_count", labels) == 25
    assert m.sample("imgserve_backend_duration_seconds_count", {"model": "rgbnet", "backend": "onnxruntime"}) == calls
    assert m.sample("imgserve_queue_depth", labels) == 0


async def test_ten_crop_items_are_split_across_backend_calls(model_repo: Path, tmp_path: Path) -> None:
    data = photo_jpeg(160, 120)
    async with running(only(model_repo, tmp_path, "rgbnet"), max_batch_size=4) as plane:
        small = await plane.probabilities("rgbnet", [data, data, data], ten_crop=True)
        sizes = plane.metrics.sample("imgserve_batch_size_count", {"model": "rgbnet"})
        biggest = plane.metrics.sample("imgserve_batch_size_bucket", {"model": "rgbnet", "le": "4.0"})
    assert sizes >= 8 and biggest == sizes                              # 30 crops in calls of at most 4
    async with running(only(model_repo, tmp_path, "rgbnet")) as plane:
        big = await plane.probabilities("rgbnet", [data, data, data], ten_crop=True)
        calls = plane.metrics.sample("imgserve_batch_size_count", {"model": "rgbnet"})
    assert calls == 1                                                   # 30 crops fit the spec's 32
    np.testing.assert_allclose(small.probabilities, big.probabilities, atol=1e-5)


async def test_deadlines(model_repo: Path, tmp_path: Path) -> None:
    data = photo_jpeg()
    async with running(only(model_repo, tmp_path, "rgbnet")) as plane:
        with pytest.raises(DeadlineExceeded):
            await plane.classify("rgbnet", [data], deadline=time.monotonic() - 1)
        # 16 large JPEGs take far longer than 2 ms to decode: the answer comes at the deadline,
        # before decoding finished (no preprocess time recorded) and before any backend call.
        with pytest.raises(DeadlineExceeded, match="while decoding|before the request started"):
            await plane.classify("rgbnet", [data] * 16, ten_crop=True, deadline=time.monotonic() + 0.002)
        labels = {"model": "rgbnet"}
        assert plane.metrics.sample("imgserve_preprocess_duration_seconds_count", labels) is None
        assert plane.metrics.sample("imgserve_batch_size_count", labels) is None
        ok = await plane.classify("rgbnet", [data], deadline=time.monotonic() + 30)
        assert len(ok.results) == 1


async def test_stop_drains_then_refuses(model_repo: Path, tmp_path: Path) -> None:
    data = photo_jpeg(160, 120)
    settings = Settings(model_repository=only(model_repo, tmp_path, "rgbnet"), backend_threads=1,
                        preprocess_threads=2, max_queue_delay_ms=600_000.0)
    backend = HeldBackend(settings)
    plane = DataPlane(settings, backend, Metrics())
    await plane.start()
    backend.go.clear()
    busy = asyncio.create_task(plane.probabilities("rgbnet", [data]))
    await until(lambda: backend.entered == 1, "the first call")
    tasks = [asyncio.create_task(plane.probabilities("rgbnet", [data])) for _ in range(5)]
    # their crops sit in the queue behind the held call; stop, then let the backend go: the drain
    # answers every accepted request
    await until(lambda: plane.metrics.sample("imgserve_queue_depth", {"model": "rgbnet"}) == 5, "5 queued")
    stopping = asyncio.create_task(plane.stop())
    await asyncio.sleep(0.05)
    assert not await plane.ready()
    backend.go.set()
    await stopping
    results = [t.result() for t in [busy, *tasks]]           # all answered, none failed
    assert all(r.probabilities.shape == (1, 10) for r in results)
    assert not await plane.ready()
    with pytest.raises(BackendUnavailable):
        await plane.probabilities("rgbnet", [data])


async def test_stop_waits_for_requests_still_decoding(model_repo: Path, tmp_path: Path) -> None:
    data = photo_jpeg()
    settings = Settings(model_repository=only(model_repo, tmp_path, "rgbnet"), backend_threads=1,
                        preprocess_threads=1)
    plane = DataPlane(settings, OnnxRuntimeBackend(settings), Metrics())
    await plane.start()
    tasks = [asyncio.create_task(plane.probabilities("rgbnet", [data] * 4, ten_crop=True)) for _ in range(3)]
    await asyncio.sleep(0)                                   # accepted, decoding in the pool
    assert plane.metrics.sample("imgserve_preprocess_duration_seconds_count", {"model": "rgbnet"}) is None
    await plane.stop()
    assert all(t.result().probabilities.shape == (4, 10) for t in tasks)


def test_request_metrics_contract() -> None:
    """metrics.request(): in-flight while inside; latency and errors by code on exit."""
    from serving.errors import Overloaded

    m = Metrics()
    with m.request("grpc.Classify", "lenet5"):
        assert m.sample("imgserve_requests_in_flight", {"endpoint": "grpc.Classify"}) == 1
    assert m.sample("imgserve_requests_in_flight", {"endpoint": "grpc.Classify"}) == 0
    with m.request("http.classify", "") as req:
        req.model, req.code = "rgbnet", "NOT_FOUND"
    with pytest.raises(Overloaded):
        with m.request("http.classify", "rgbnet"):
            raise Overloaded("full")
    with pytest.raises(ZeroDivisionError):
        with m.request("grpc.Classify", "lenet5"):
            1 / 0
    ok = {"model": "lenet5", "endpoint": "grpc.Classify", "code": "OK"}
    assert m.sample("imgserve_request_duration_seconds_count", ok) == 1
    assert m.sample("imgserve_request_errors_total", ok) is None
    for endpoint, model, code in [("http.classify", "rgbnet", "NOT_FOUND"),
                                  ("http.classify", "rgbnet", "RESOURCE_EXHAUSTED"),
                                  ("grpc.Classify", "lenet5", "INTERNAL")]:
        labels = {"model": model, "endpoint": endpoint, "code": code}
        assert m.sample("imgserve_request_errors_total", labels) == 1
        assert m.sample("imgserve_request_duration_seconds_count", labels) == 1
    body, content_type = m.exposition()
    assert content_type.startswith("text/plain")
    assert b"imgserve_request_errors_total{" in body and b"_created" not in body
    assert Metrics().registry is not m.registry                 # private registries never collide


async def test_onnxruntime_backend_checks_its_input(model_repo: Path, tmp_path: Path) -> None:
    settings = Settings(model_repository=only(model_repo, tmp_path, "lenet5"), backend_threads=1)
    backend = OnnxRuntimeBackend(settings)
    assert not await backend.ready()
    await backend.start()
    try:
        assert await backend.ready() and list(await backend.models()) == ["lenet5"]
        probs = (await backend.infer("lenet5", np.zeros((3, 28, 28, 1), np.uint8)))["probabilities"]
        assert probs.shape == (3, 10) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        with pytest.raises(ModelNotFound):
            await backend.infer("rgbnet", np.zeros((1, 64, 64, 3), np.uint8))
        with pytest.raises(InvalidInput, match="uint8"):
            await backend.infer("lenet5", np.zeros((1, 28, 28, 1), np.float32))
        with pytest.raises(InvalidInput, match=r"\[N, 28, 28, 1\]"):
            await backend.infer("lenet5", np.zeros((1, 28, 28, 3), np.uint8))
    finally:
        await backend.close()
    assert not await backend.ready()


async def test_onnxruntime_backend_refuses_a_broken_repository(tmp_path: Path) -> None:
    missing = OnnxRuntimeBackend(Settings(model_repository=tmp_path / "nowhere"))
    with pytest.raises(BackendUnavailable, match="does not exist"):
        await missing.start()
    broken = tmp_path / "broken" / "m"
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "model.onnx").write_bytes(b"not an onnx file")
    (broken / "config.pbtxt").write_text(
        'name: "m"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 4\n'
        'input { name: "image" data_type: TYPE_UINT8 dims: [8, 8, 1] }\n'
        'output { name: "probabilities" data_type: TYPE_FP32 dims: [2] }\n'
        'parameters { key: "imgserve.resize" value { string_value: "8" } }\n'
        'parameters { key: "imgserve.crop" value { string_value: "8" } }\n'
        'parameters { key: "imgserve.channels" value { string_value: "1" } }\n')
    with pytest.raises(BackendUnavailable, match="model 'm': cannot load"):
        await OnnxRuntimeBackend(Settings(model_repository=broken.parent)).start()
