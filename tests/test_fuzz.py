"""Hostile input, fuzzed with hypothesis: every parser answers a clear InvalidInput or succeeds.

Targets: image decoding (arbitrary bytes and mutated valid PNG/JPEG), v2 BYTES tensor
deserialization, the JSON request parsers of the HTTP door (/v1 and /v2), the gRPC v2
request reader, and the batcher's promise that every request gets exactly its rows in order.

CI-sized and reproducible: every test runs a fixed number of examples with
``derandomize=True`` (the same examples on every run, no example database), so a
failure here is a real regression, never flakiness; the whole file takes a few seconds.
Raise IMGSERVE_FUZZ_EXAMPLES for a longer local hunt (``make soak`` territory).
"""
from __future__ import annotations

import asyncio
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.requirements import require_module

require_module("hypothesis", "a dev dependency: pip install -e '.[dev]'")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from clients.proto.imgserve.v1 import imgserve_pb2 as pb  # noqa: E402
from serving.batcher import Batcher  # noqa: E402
from serving.errors import InvalidInput  # noqa: E402
from serving.preprocess import DecodeOptions, configure_pillow, decode  # noqa: E402
from serving.transports import oip  # noqa: E402
from serving.transports.http import parse_json_object, parse_v1_request, v2_images, v2_outputs  # noqa: E402

pytestmark = pytest.mark.timeout(120)

EXAMPLES = int(os.environ.get("IMGSERVE_FUZZ_EXAMPLES", "60"))
CI = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SMALL_LIMIT = DecodeOptions(max_pixels=4096 * 4096)


def _encoded(fmt: str, mode: str = "RGB") -> bytes:
    pixels = np.random.default_rng(3).integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, fmt)
    return buf.getvalue()


SEEDS = [_encoded("PNG"), _encoded("PNG", "L"), _encoded("JPEG"), _encoded("GIF", "P"), _encoded("BMP")]


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid small image with a few bytes flipped, a slice cut out or inserted, or its tail cut off."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[pos:pos + draw(st.integers(1, 32))]
    return bytes(data)


def _decode_or_invalid(data: bytes, channels: int) -> None:
    try:
        img = decode(data, channels=channels, index=3, target=8, options=SMALL_LIMIT)
    except InvalidInput as exc:
        assert exc.message.startswith("image 3: "), exc.message  # the client learns which image
        return
    assert img.mode == ("L" if channels == 1 else "RGB") and img.size[0] > 0 and img.size[1] > 0


@pytest.fixture(autouse=True, scope="module")
def _pillow_guards() -> None:
    configure_pillow(SMALL_LIMIT.max_pixels)


@CI
@given(data=st.binary(max_size=512), channels=st.sampled_from([1, 3]))
def test_decode_arbitrary_bytes(data: bytes, channels: int) -> None:
    _decode_or_invalid(data, channels)


@CI
@given(data=mutated_images(), channels=st.sampled_from([1, 3]))
def test_decode_mutated_png_jpeg_gif_bmp(data: bytes, channels: int) -> None:
    _decode_or_invalid(data, channels)


# ---------------------------------------------------------------- v2 BYTES

@CI
@given(elements=st.lists(st.binary(max_size=64), max_size=12))
def test_bytes_tensor_round_trip(elements: list[bytes]) -> None:
    assert oip.deserialize_bytes(oip.serialize_bytes(elements)) == elements


@CI
@given(data=st.binary(max_size=256))
def test_bytes_tensor_garbage_is_invalid_input(data: bytes) -> None:
    try:
        elements = oip.deserialize_bytes(data)
    except InvalidInput:
        return
    assert oip.serialize_bytes(elements) == data  # what parses is exactly what was sent


# ---------------------------------------------------------------- JSON requests

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
V1_KEYS = ["model", "images", "topK", "top_k", "tenCrop", "scoreThreshold", "maxDetections", "tta", "rle", "x"]


@st.composite
def v1_documents(draw: st.DrawFn) -> bytes:
    doc = draw(st.dictionaries(st.sampled_from(V1_KEYS), JSON_VALUES | st.lists(st.text(max_size=12), max_size=3),
                               max_size=5))
    return json.dumps(doc).encode()


@CI
@given(body=st.binary(max_size=200) | v1_documents(),
       message=st.sampled_from([pb.ClassifyRequest, pb.DetectRequest, pb.SegmentRequest]))
def test_v1_json_parsing_is_message_or_invalid_input(body: bytes, message: type) -> None:
    try:
        parsed = parse_v1_request(body, message)
    except InvalidInput:
        return
    assert isinstance(parsed, message)


@CI
@given(body=st.binary(max_size=200))
def test_json_object_parsing(body: bytes) -> None:
    try:
        assert isinstance(parse_json_object(body, "request body"), dict)
    except InvalidInput:
        pass


@st.composite
def v2_documents(draw: st.DrawFn) -> tuple[dict, bytes]:
    tensor = draw(st.fixed_dictionaries(
        {}, optional={"name": st.sampled_from(["image", "input", 3]), "datatype": st.sampled_from(["BYTES", "FP32", None]),
                      "shape": st.lists(st.integers(-2, 4), max_size=3) | JSON_VALUES,
                      "data": JSON_VALUES | st.lists(st.text(max_size=6), max_size=4),
                      "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": st.integers(-2, 80)
                                                                        | JSON_VALUES}) | JSON_VALUES}))
    doc = draw(st.fixed_dictionaries({}, optional={
        "inputs": st.lists(st.just(tensor), max_size=2) | JSON_VALUES,
        "outputs": st.lists(st.fixed_dictionaries({"name": st.text(max_size=6) | JSON_VALUES}, optional={
            "parameters": st.fixed_dictionaries({}, optional={"classification": JSON_VALUES,
                                                              "binary_data": JSON_VALUES}) | JSON_VALUES}),
            max_size=2) | JSON_VALUES,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_output": JSON_VALUES}) | JSON_VALUES}))
    binary = draw(st.binary(max_size=40) | st.builds(oip.serialize_bytes, st.lists(st.binary(max_size=8), max_size=3)))
    return doc, binary


@CI
@given(request=v2_documents())
def test_v2_json_request_parsing(request: tuple[dict, bytes]) -> None:
    doc, binary = request
    try:
        images = v2_images(doc, binary)
        assert all(isinstance(i, bytes) for i in images)
    except InvalidInput:
        pass
    try:
        outputs, binary_default = v2_outputs(doc)
        assert isinstance(binary_default, bool)
    except InvalidInput:
        pass


@CI
@given(raw=st.binary(max_size=300))
def test_grpc_v2_request_reader(raw: bytes) -> None:
    """Whatever protobuf parses into a ModelInferRequest, request_images answers or says why not."""
    from tritonclient.grpc import service_pb2 as v2

    from serving.transports.grpc_v2 import request_images, requested_outputs
    request = v2.ModelInferRequest()
    try:
        request.ParseFromString(raw)
    except Exception:  # noqa: BLE001 - the server refuses these earlier (serving/transports/grpc_guard.py)
        return
    for reader in (request_images, requested_outputs):
        try:
            reader(request)
        except InvalidInput:
            pass


# ---------------------------------------------------------------- batcher ordering

@CI
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=12), max_batch=st.integers(1, 8),
       concurrent=st.integers(1, 3), delay_ms=st.sampled_from([0.0, 1.0]))
def test_batcher_gives_every_request_exactly_its_rows_in_order(sizes: list[int], max_batch: int, concurrent: int,
                                                               delay_ms: float) -> None:
    batches: list[int] = []

    async def infer(batch: np.ndarray) -> dict[str, np.ndarray]:
        batches.append(len(batch))
        await asyncio.sleep(0)
        return {"ids": batch[:, 0].copy(), "doubled": batch * 2}

    async def run() -> None:
        batcher = Batcher("fuzz", infer, max_batch_size=max_batch, max_queue_delay_s=delay_ms / 1000,
                          max_queue_size=sum(sizes), max_concurrent_batches=concurrent)
        await batcher.start()
        try:
            starts = np.cumsum([0, *sizes])
            requests = [np.arange(starts[i], starts[i] + n, dtype=np.int64).reshape(n, 1) for i, n in enumerate(sizes)]
            results = await asyncio.gather(*(batcher.submit(list(r)) for r in requests))
        finally:
            await batcher.stop(timeout=5)
        for sent, got in zip(requests, results):
            assert got["ids"].tolist() == sent[:, 0].tolist()
            assert got["doubled"].tolist() == (sent * 2).tolist()

    asyncio.run(run())
    assert sum(batches) == sum(sizes) and max(batches) <= max_batch
