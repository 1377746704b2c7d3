"""Where tiny work runs: on the event loop (no thread hop) or in a pool, and that answers are equal.

Decoding a 28x28 PNG or running LeNet on a batch costs less than the trip through a thread
pool, so the data plane decodes tiny images inline and the embedded backend runs calls
measured below ``inline_infer_ms`` inline. These tests pin the decisions (including the
decompression-bomb guard: a small file whose header promises many pixels goes to the pool)
and that both routes give identical results. No timing is asserted.
"""
from __future__ import annotations

import io
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.backends.onnxruntime import OnnxRuntimeBackend
from serving.dataplane import DataPlane
from serving.metrics import Metrics
from serving.admission import header_pixels
from serving.settings import Settings
from tests.fakes import ScriptedBackend, grey_png
from tests.tiny_onnx import tiny_onnx_repository

pytestmark = pytest.mark.timeout(120)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height (what a bomb's header looks like)."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + len(ihdr).to_bytes(4, "big") + chunk + zlib.crc32(chunk).to_bytes(4, "big")


def jpeg(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def test_header_pixels_reads_headers_only() -> None:
    """PNG sizes come straight from IHDR (with Pillow's bomb rule), other formats from Pillow's header read."""
    from PIL import Image

    assert header_pixels(grey_png(7)) == 16
    assert header_pixels(png_header_only(5000, 4000)) == 20_000_000
    assert header_pixels(png_header_only(60000, 60000)) == 1 << 62 > 2 * Image.MAX_IMAGE_PIXELS
    assert header_pixels(jpeg(30)) == 900
    assert header_pixels(b"not an image") is None


def test_tiny_images_decode_inline_large_or_unknown_ones_in_the_pool() -> None:
    plane = DataPlane(Settings(inline_preprocess_pixels=1000), ScriptedBackend(), Metrics())
    assert plane._tiny([grey_png(1), grey_png(2)])                 # 16 + 16 pixels
    assert not plane._tiny([png_header_only(20000, 20000)])       # a bomb's header: never on the loop
    assert plane._tiny([b"x"], costs=[16]) and not plane._tiny([b"x", b"y"], costs=[16, 0])  # unknown: pool
    assert not plane._tiny([jpeg(30), jpeg(30)])                  # 1800 > 1000 pixels together
    assert not plane._tiny([b"garbage"])                          # the pool's decoder explains the error
    assert not DataPlane(Settings(inline_preprocess_pixels=0), ScriptedBackend(), Metrics())._tiny([grey_png(1)])


async def test_inline_and_pool_decoding_answer_the_same() -> None:
    answers = []
    for pixels in (0, 16384):
        backend = ScriptedBackend()
        plane = DataPlane(Settings(inline_preprocess_pixels=pixels, preprocess_threads=1), backend, Metrics())
        await plane.start()
        try:
            result = await plane.probabilities("tiny", [grey_png(1), grey_png(2)])
            with pytest.raises(Exception, match="image 1"):
                await plane.probabilities("tiny", [grey_png(1), b"\x89PNG\r\n\x1a\nbroken"])
        finally:
            await plane.stop()
        answers.append(result.probabilities)
    np.testing.assert_array_equal(answers[0], answers[1])


async def test_fast_backend_calls_move_onto_the_loop_and_answer_the_same(tmp_path: Path) -> None:
    repo = tiny_onnx_repository(tmp_path)
    batch = np.arange(2 * 16, dtype=np.uint8).reshape(2, 4, 4, 1)
    threads: dict[float, set[str]] = {}
    answers = {}
    for limit in (0.0, 1e6):                   # never inline; inline once measured (any call is < 1000 s)
        backend = OnnxRuntimeBackend(Settings(model_repository=repo, inline_infer_ms=limit, backend_threads=1))
        await backend.start()
        seen: set[str] = set()
        run = backend._run

        def spy(loaded, b, run=run, seen=seen):
            seen.add(threading.current_thread().name)
            return run(loaded, b)

        backend._run = spy  # type: ignore[method-assign]
        try:
            first = await backend.infer("tiny", batch)     # not measured yet: the pool
            later = [await backend.infer("tiny", batch) for _ in range(3)]
        finally:
            await backend.close()
        threads[limit] = seen
        answers[limit] = [first["probabilities"], *(x["probabilities"] for x in later)]
    main = threading.current_thread().name
    assert main not in threads[0.0]                       # limit 0: every call in the ort pool
    assert main in threads[1e6] and len(threads[1e6]) == 2  # the first call in the pool, then inline
    for a, b in zip(answers[0.0], answers[1e6]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("spin, expected", [(False, "0"), (True, "1")])
def test_ort_pool_threads_sleep_between_calls_unless_spinning_is_asked(tmp_path: Path, spin: bool,
                                                                       expected: str) -> None:
    """ORT's default spin-wait steals the cores the gateway decodes and answers RPCs on (lenet5 at c=32:
    0.46x Triton direct spinning, 0.65x not; docs/performance.md), so the embedded backend turns it off."""
    backend = OnnxRuntimeBackend(Settings(model_repository=tmp_path, backend_spin=spin))
    assert backend._session_options().get_session_config_entry("session.intra_op.allow_spinning") == expected
    if not spin:
        assert Settings().backend_spin is False  # the default is the gateway's case
