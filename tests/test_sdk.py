"""The client SDK: input normalization, the error hierarchy, and real calls to a real gateway.

End-to-end tests start ``imgserve serve`` (tests/procs.py) on the session's model
repository and compare what every client (sync/async x gRPC/HTTP) gets with
what the exported ONNX model says offline.
"""
from __future__ import annotations

import asyncio
import io
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clients.sdk import (AsyncImageClient, ClassifyResult, DeadlineExceeded, ImageClient, ImgserveError,
                         InternalError, InvalidArgument, ModelInfo, NotFound, Prediction, ResourceExhausted,
                         Unavailable)
from clients.sdk.errors import from_grpc, from_http
from clients.sdk.images import as_image_list, encode_images, to_image_bytes
from clients.sdk.wire import Endpoint, parse_target
from tests.procs import refused_port, run_gateway

N_DIGITS = 12
KINDS = ("path", "bytes", "pil", "array")
CLIENTS = [("grpc", False), ("grpc", True), ("http", False), ("http", True)]
CLIENT_IDS = ["grpc-sync", "grpc-async", "http-sync", "http-async"]


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def target(gw: object, protocol: str) -> str:
    return gw.grpc_target if protocol == "grpc" else gw.http_url  # type: ignore[attr-defined]


def call(protocol_target: str, is_async: bool, method: str, *args: object, **kwargs: object) -> object:
    """Run one SDK call through a fresh sync or async client."""
    if not is_async:
        with ImageClient(protocol_target) as client:
            return getattr(client, method)(*args, **kwargs)

    async def run() -> object:
        async with AsyncImageClient(protocol_target) as client:
            return await getattr(client, method)(*args, **kwargs)
    return asyncio.run(run())


# ------------------------------------------------------------------ no server needed

# (grpcio itself imports grpc_health / grpc_reflection when they happen to be installed, so they are not listed.)
NON_CORE = ("torch", "torchvision", "serving", "export", "onnxruntime", "onnx", "tritonclient", "prometheus_client",
            "matplotlib")


def test_clients_use_only_core_dependencies() -> None:
    """Importing every client module pulls in nothing from the server, torch or the optional extras."""
    code = ("import sys, clients.sdk, clients.sdk.aio, clients.bench, clients.commands.classify, "
            "clients.commands.models, clients.commands.bench\n"
            f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({NON_CORE!r}))\n"
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr



@pytest.mark.parametrize("raw, protocol, expected", [
    ("localhost:8500", None, Endpoint("grpc", "localhost:8500")),
    ("localhost", None, Endpoint("grpc", "localhost:8500")),
    ("grpc://10.0.0.1:9000", None, Endpoint("grpc", "10.0.0.1:9000")),
    ("http://localhost:8080/", None, Endpoint("http", "http://localhost:8080")),
    ("HTTPS://gw.example:443", "http", Endpoint("http", "HTTPS://gw.example:443")),
    ("localhost:8080", "http", Endpoint("http", "http://localhost:8080")),
    (" 127.0.0.1:1 ", "grpc", Endpoint("grpc", "127.0.0.1:1")),
])
def test_parse_target(raw: str, protocol: str | None, expected: Endpoint) -> None:
    assert parse_target(raw, protocol) == expected


@pytest.mark.parametrize("raw, protocol", [
    ("http://localhost:8080", "grpc"), ("grpc://localhost:1", "http"), ("", None), ("localhost:1", "ftp"),
])
def test_parse_target_rejects_contradictions(raw: str, protocol: str | None) -> None:
    with pytest.raises(ValueError):
        parse_target(raw, protocol)


@pytest.mark.parametrize("shape", [(7, 5), (7, 5, 1), (7, 5, 3), (7, 5, 4)])
def test_arrays_encode_losslessly(shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
    decoded = decode(to_image_bytes(array))
    np.testing.assert_array_equal(decoded, array.reshape(shape[:2]) if shape[-1:] == (1,) else array)


def test_pil_images_encode_losslessly() -> None:
    rgb = np.random.default_rng(2).integers(0, 256, size=(6, 9, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode(to_image_bytes(Image.fromarray(rgb))), rgb)
    pal = Image.fromarray(rgb).quantize(colors=8)  # mode P keeps its palette
    again = Image.open(io.BytesIO(to_image_bytes(pal)))
    assert again.mode == "P"
    np.testing.assert_array_equal(np.asarray(again.convert("RGB")), np.asarray(pal.convert("RGB")))
    cmyk = Image.fromarray(rgb).convert("CMYK")  # PNG cannot hold CMYK: sent as RGB
    assert Image.open(io.BytesIO(to_image_bytes(cmyk))).mode == "RGB"


def test_paths_bytes_and_files_are_sent_untouched(tmp_path: Path) -> None:
    data = png_bytes(np.full((4, 4), 200, np.uint8))
    path = tmp_path / "x.png"
    path.write_bytes(data)
    with open(path, "rb") as f:
        kinds = [str(path), path, data, bytearray(data), memoryview(data), f]
        assert encode_images(kinds) == [data] * len(kinds)


def test_one_image_or_many() -> None:
    gray = np.zeros((5, 5), np.uint8)
    assert len(as_image_list(gray)) == 1
    assert len(as_image_list(np.zeros((5, 5, 3), np.uint8))) == 1
    assert len(as_image_list(np.zeros((4, 5, 5, 1), np.uint8))) == 4  # NHWC batch
    assert len(as_image_list(b"abc")) == 1 and len(as_image_list("a.png")) == 1
    assert len(as_image_list([gray, gray, b"x"])) == 3
    assert len(as_image_list(iter([gray, gray]))) == 2


@pytest.mark.parametrize("bad, fragment", [
    (np.zeros((5, 5), np.float32), "uint8"),
    (np.zeros((5, 5, 2), np.uint8), "shape"),
    (np.zeros((0, 5), np.uint8), "empty"),
    (np.zeros((1, 1, 1, 1, 1), np.uint8), "dimensions"),
    ([], "no images"),
    (b"", "empty"),
    (12, "unsupported image type"),
    ([b"ok", 3.5], "image 1"),
    ("/no/such/file.png", "cannot read"),
    (Image.new("F", (3, 3)), "mode 'F'"),
])
def test_bad_inputs_raise_invalid_argument(bad: object, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        encode_images(bad)
    assert fragment in info.value.message and info.value.code == "INVALID_ARGUMENT"


def test_http_errors_map_to_the_hierarchy() -> None:
    err = from_http(404, b'{"error": {"code": "NOT_FOUND", "message": "no model x"}}', {})
    assert type(err) is NotFound and err.code == "NOT_FOUND" and err.message == "no model x"
    err = from_http(429, b'{"error": {"code": "RESOURCE_EXHAUSTED", "message": "busy"}}', {"Retry-After": "3"})
    assert isinstance(err, ResourceExhausted) and err.retry_after == 3.0
    err = from_http(503, b"<html>bad gateway</html>", {})  # not ours: a proxy page
    assert type(err) is Unavailable and "HTTP 503" in err.message and "bad gateway" in err.message
    err = from_http(500, b'{"error": {"code": "DATA_LOSS", "message": "m"}}', {})
    assert type(err) is ImgserveError and err.code == "DATA_LOSS"
    assert isinstance(from_http(500, b"", {}), InternalError)


def test_grpc_errors_map_to_the_hierarchy() -> None:
    err = from_grpc("RESOURCE_EXHAUSTED", "queue full", {"retry-after": "2"})
    assert isinstance(err, ResourceExhausted) and err.retry_after == 2.0 and err.message == "queue full"
    assert isinstance(from_grpc("DEADLINE_EXCEEDED", None, None), DeadlineExceeded)
    assert str(from_grpc("INVALID_ARGUMENT", "bad", None)) == "INVALID_ARGUMENT: bad"


@pytest.mark.parametrize("protocol, is_async", CLIENTS, ids=CLIENT_IDS)
def test_refused_connection_is_unavailable(protocol: str, is_async: bool) -> None:
    with refused_port() as port:  # held for the test, nothing listens there
        addr = f"127.0.0.1:{port}" if protocol == "grpc" else f"http://127.0.0.1:{port}"
        with pytest.raises(Unavailable):
            call(addr, is_async, "models")


@pytest.fixture()
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.mark.parametrize("protocol, is_async", CLIENTS, ids=CLIENT_IDS)
def test_timeout_is_deadline_exceeded(silent_server: int, protocol: str, is_async: bool) -> None:
    addr = f"127.0.0.1:{silent_server}" if protocol == "grpc" else f"http://127.0.0.1:{silent_server}"
    with pytest.raises(DeadlineExceeded):
        call(addr, is_async, "classify", b"x", "lenet5", timeout=0.5)


def test_closed_client_refuses_calls() -> None:
    client = ImageClient("127.0.0.1:1")
    client.close()
    client.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        client.models()


# ------------------------------------------------------------------ against a real gateway

@pytest.fixture(scope="module")
def gateway(model_repo: Path) -> Iterator[object]:
    with run_gateway(model_repo) as gw:
        yield gw


@pytest.fixture(scope="module")
def digits(mnist_heldout: tuple[np.ndarray, np.ndarray], tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[np.ndarray, list[Path]]:
    """The first held-out digits as arrays and as PNG files."""
    images = mnist_heldout[0][:N_DIGITS]
    folder = tmp_path_factory.mktemp("digits")
    paths = []
    for i, img in enumerate(images):
        paths.append(folder / f"digit_{i:02d}.png")
        paths[-1].write_bytes(png_bytes(img))
    return images, paths


def inputs_of_kind(kind: str, digits: tuple[np.ndarray, list[Path]]) -> list[object]:
    images, paths = digits
    return {
        "path": [str(p) for p in paths],
        "bytes": [p.read_bytes() for p in paths],
        "pil": [Image.fromarray(a) for a in images],
        "array": list(images),
    }[kind]


def test_models_describe_the_repository(gateway: object) -> None:
    for protocol in ("grpc", "http"):
        with ImageClient(target(gateway, protocol)) as client:
            models = {m.name: m for m in client.models()}
            assert client.model("lenet5") == models["lenet5"]
            with pytest.raises(NotFound, match="available: lenet5, rgbnet"):
                client.model("nope")
        lenet, rgb = models["lenet5"], models["rgbnet"]
        assert isinstance(lenet, ModelInfo) and lenet.ready and rgb.ready
        assert (lenet.num_classes, lenet.channels, lenet.crop, lenet.task) == (10, 1, 28, "classification")
        assert (rgb.resize, rgb.crop, rgb.channels) == (72, 64, 3)
        # the config's imgserve.description, over both protocols (conftest's model_repo writes it)
        assert lenet.description == "LeNet-5 trained on the bundled MNIST sample"
        assert rgb.description.startswith("resnet18 with random weights")


@pytest.mark.parametrize("protocol, is_async", CLIENTS, ids=CLIENT_IDS)
def test_every_input_kind_matches_the_offline_model(gateway: object, digits: tuple[np.ndarray, list[Path]],
                                                    lenet_offline_predictions: object,
                                                    protocol: str, is_async: bool) -> None:
    offline = lenet_offline_predictions.probabilities[:N_DIGITS]  # type: ignore[attr-defined]
    results = {kind: call(target(gateway, protocol), is_async, "classify", inputs_of_kind(kind, digits),
                          "lenet5", top_k=3)
               for kind in KINDS}
    first = results["path"]
    assert isinstance(first, ClassifyResult) and first.model == "lenet5" and not first.ten_crop
    for kind in KINDS:
        assert results[kind] == first, kind
    assert len(first) == N_DIGITS
    for preds, probs in zip(first, offline):
        assert [p.index for p in preds] == list(np.argsort(-probs, kind="stable")[:3])
        assert all(isinstance(p, Prediction) and p.label == str(p.index) for p in preds)
        np.testing.assert_allclose([p.score for p in preds], np.sort(probs)[::-1][:3], rtol=1e-4, atol=1e-6)


def test_transports_and_clients_agree_exactly(gateway: object, digits: tuple[np.ndarray, list[Path]]) -> None:
    images = list(digits[0])
    got = [call(target(gateway, protocol), is_async, "classify", images, "lenet5", top_k=10)
           for protocol, is_async in CLIENTS]
    assert all(g == got[0] for g in got[1:])
    assert got[0].version and all(len(p) == 10 for p in got[0])  # type: ignore[attr-defined]


# (model, top_k, image): unknown model, top_k=0, undecodable bytes.
BAD_CALLS = [("no_such_model", 5, "digit"), ("lenet5", 0, "digit"), ("lenet5", 5, "garbage")]


@pytest.mark.parametrize("protocol, is_async", CLIENTS, ids=CLIENT_IDS)
def test_errors_are_typed_the_same_on_every_transport(gateway: object, digits: tuple[np.ndarray, list[Path]],
                                                      protocol: str, is_async: bool) -> None:
    images = {"digit": digits[0][0], "garbage": b"definitely not an image"}
    addr = target(gateway, protocol)
    outcomes: list[object] = []
    if is_async:
        async def run() -> None:
            async with AsyncImageClient(addr) as client:
                for model, top_k, image in BAD_CALLS:
                    try:
                        outcomes.append(await client.classify(images[image], model, top_k=top_k))
                    except ImgserveError as exc:
                        outcomes.append(exc)
                outcomes.append(await client.classify(images["digit"], "lenet5"))  # still usable
        asyncio.run(run())
    else:
        with ImageClient(addr) as client:
            for model, top_k, image in BAD_CALLS:
                try:
                    outcomes.append(client.classify(images[image], model, top_k=top_k))
                except ImgserveError as exc:
                    outcomes.append(exc)
            outcomes.append(client.classify(images["digit"], "lenet5"))
    not_found, bad_k, garbage, ok = outcomes
    assert isinstance(not_found, NotFound) and not_found.code == "NOT_FOUND" and "no_such_model" in not_found.message
    assert isinstance(bad_k, InvalidArgument) and "top_k" in bad_k.message
    assert isinstance(garbage, InvalidArgument) and garbage.code == "INVALID_ARGUMENT"
    assert isinstance(ok, ClassifyResult) and len(ok) == 1 and len(ok[0]) == 5


def test_ten_crop_and_rgb_inputs(gateway: object) -> None:
    rng = np.random.default_rng(3)
    rgb = [rng.integers(0, 256, size=(90, 80, 3), dtype=np.uint8) for _ in range(2)]
    results = {}
    for protocol in ("grpc", "http"):
        with ImageClient(target(gateway, protocol)) as client:
            for ten_crop in (False, True):
                r = client.classify(rgb + [Image.fromarray(rgb[0])], "rgbnet", top_k=10, ten_crop=ten_crop)
                assert r.ten_crop is ten_crop and r.model == "rgbnet"
                assert r[0] == r[2]  # the array and the PIL image of the same pixels
                scores = [p.score for p in r[0]]
                assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1.0) < 1e-3
                results[protocol, ten_crop] = r
            assert len(client.classify(rgb[0], "rgbnet", top_k=None)[0]) == 5  # the server default
    assert results["grpc", True] == results["http", True] and results["grpc", False] == results["http", False]
    # 10-crop averages ten views: the probabilities differ from the single centre crop.
    assert results["grpc", True][0] != results["grpc", False][0]


def test_large_images_pass_the_raised_message_limits(gateway: object) -> None:
    noise = np.random.default_rng(4).integers(0, 256, size=(1400, 1400, 3), dtype=np.uint8)
    data = png_bytes(noise)
    assert len(data) > 4 * 1024 * 1024  # above gRPC's default 4 MiB receive limit
    for protocol in ("grpc", "http"):
        with ImageClient(target(gateway, protocol), timeout=60) as client:
            assert len(client.classify(data, "rgbnet", top_k=1)) == 1


def test_one_sync_client_serves_many_threads(gateway: object, digits: tuple[np.ndarray, list[Path]]) -> None:
    images = digits[0]
    with ImageClient(gateway.grpc_target) as client:  # type: ignore[attr-defined]
        expected = [client.classify(img, "lenet5", top_k=1).top1[0] for img in images[:4]]
        got: dict[int, list[Prediction]] = {}

        def work(t: int) -> None:
            got[t] = [client.classify(img, "lenet5", top_k=1).top1[0] for img in images[:4]]
        threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert got == {t: expected for t in range(6)}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
async def test_async_client_runs_calls_concurrently(gateway: object, digits: tuple[np.ndarray, list[Path]],
                                                    protocol: str) -> None:
    images = digits[0]
    async with AsyncImageClient(target(gateway, protocol), timeout=30) as client:
        results = await asyncio.gather(*(client.classify(images[i % len(images)], "lenet5", top_k=1)
                                         for i in range(24)))
        single = await client.classify(list(images), "lenet5", top_k=1)
    assert [r.top1[0] for r in results] == [single.top1[i % len(images)] for i in range(24)]


def test_overload_is_resource_exhausted_with_retry_after(model_repo: Path) -> None:
    """A queue of 4 items and 40 concurrent 4-image requests: most are refused, with a retry hint."""
    img = np.random.default_rng(5).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)

    async def burst(addr: str) -> list[object]:
        async with AsyncImageClient(addr, timeout=60) as client:
            async def one() -> object:
                try:
                    return await client.classify([img] * 4, "rgbnet", ten_crop=False)
                except ImgserveError as exc:
                    return exc
            return await asyncio.gather(*(one() for _ in range(40)))

    with run_gateway(model_repo, extra_args=["--max-queue-size", "4"]) as gw:
        for protocol in ("grpc", "http"):
            outcomes = asyncio.run(burst(target(gw, protocol)))
            refused = [o for o in outcomes if isinstance(o, ImgserveError)]
            assert refused and len(refused) < len(outcomes), protocol
            assert all(isinstance(o, ResourceExhausted) for o in refused), refused[:3]
            assert all(o.retry_after is not None and o.retry_after >= 1 for o in refused)  # type: ignore[union-attr]
