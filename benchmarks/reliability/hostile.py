"""The hostile battery: many kinds of bad request against a real ``imgserve serve`` process.

Why: the promise of issue #9 is "every request answered with a result or a clear error,
whatever the input". Fuzzing (tests/test_fuzz.py) covers the parsers in process; this
battery covers the whole process from the outside: each kind of bad request goes over
the wire (HTTP v1, HTTP v2, gRPC, or a raw socket), the status the client saw is compared
with the expected one, and after every case the process must still be alive and answer a
good request. At the end its resident memory (VmRSS) must be back near the baseline taken
after warm-up, so no kind leaks what it allocated.

``hostile_battery()`` is a stage of benchmarks/reliability/figures.py (``--only hostile``);
tests/test_hostile_battery.py runs it at CI size and asserts every row and the RSS bound.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import struct
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
from PIL import Image
from tritonclient.grpc import service_pb2 as v2
from tritonclient.grpc import service_pb2_grpc as v2_grpc

from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from clients.proto.imgserve.v1 import imgserve_pb2_grpc as pb_grpc

# The limits the battery's gateway runs with (small, so going over them costs little).
MAX_MESSAGE_MB = 2
MAX_IMAGES = 8
MAX_IMAGE_PIXELS = 1_000_000
MAX_REQUEST_PIXELS = 2_000_000
GATEWAY_ARGS = ["--max-message-mb", str(MAX_MESSAGE_MB), "--max-images-per-request", str(MAX_IMAGES),
                "--max-image-pixels", str(MAX_IMAGE_PIXELS), "--max-request-pixels", str(MAX_REQUEST_PIXELS),
                "--backend-threads", "1"]
# RSS after the battery may exceed the warm baseline by this much: allocator arenas and
# grpc/aiohttp buffers that grew for the over-limit bodies are kept by design, and the
# measurement itself is noisy by a few MB. A leak per request shows at once in the soak run
# (every case repeated), which is where the bound matters.
RSS_MARGIN_MB = 40.0


@dataclass(frozen=True)
class Row:
    """One case: what was sent, what the client should see, what it saw, and whether the process lived."""

    kind: str
    door: str
    expected: str
    got: str
    alive: bool
    ms: float

    @property
    def ok(self) -> bool:
        return self.got == self.expected and self.alive


@dataclass
class Target:
    """Where the gateway under test listens, and the models the battery uses."""

    grpc: str
    http: str
    http_port: int
    classifier: str
    detector: str
    session: aiohttp.ClientSession
    channel: grpc.aio.Channel


# ---------------------------------------------------------------- images, good and bad

def png(width: int, height: int, channels: int = 1, value: int = 128) -> bytes:
    mode = "L" if channels == 1 else "RGB"
    buf = io.BytesIO()
    Image.new(mode, (width, height), value if channels == 1 else (value,) * 3).save(buf, "PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, rows: bytes = b"") -> bytes:
    """A greyscale PNG built by hand, so the header may say what Pillow would never write (0 x 0, 10^5 squared)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


def bad_crc_png() -> bytes:
    data = bytearray(png(16, 16))
    data[29] ^= 0xFF          # the IHDR CRC (bytes 29-32)
    return bytes(data)


@functools.lru_cache(maxsize=2)
def bomb_png(side: int = 30_000) -> bytes:
    """A side x side greyscale PNG of zeros: under 1 MB on the wire, ``side``^2 bytes decoded.

    Compressing 900 MB of zeros takes tens of seconds, so the stream is assembled: after a
    full flush deflate forgets its history, so every identical block of rows compresses to
    identical bytes, and the zlib trailer of n zero bytes is adler32 = (n mod 65521) << 16 | 1.
    """
    row = side + 1                           # filter byte + pixels
    per_block = 256
    blocks, rest = divmod(side, per_block)

    def piece(rows: int) -> bytes:
        c = zlib.compressobj(9)
        return (c.compress(b"\x00" * row * rows) + c.flush(zlib.Z_FULL_FLUSH))[2:]   # without the zlib header

    stream = (b"\x78\xda" + piece(per_block) * blocks + (piece(rest) if rest else b"")
              + b"\x03\x00" + struct.pack(">I", ((row * side) % 65521) << 16 | 1))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


GOOD = png(28, 28)


# ---------------------------------------------------------------- how each door is spoken to

async def http_call(t: Target, method: str, path: str, *, body: bytes | None = None, json_doc: object = None,
                    headers: dict[str, str] | None = None, version: str = "") -> str:
    """"STATUS CODE" (CODE from an imgserve.v1 error body) or "STATUS" (v2 errors and successes)."""
    hdrs = dict(headers or {})
    if json_doc is not None:
        body = json.dumps(json_doc).encode()
        hdrs.setdefault("Content-Type", "application/json")
    try:
        async with t.session.request(method, f"{t.http}{path}", data=body, headers=hdrs,
                                     timeout=aiohttp.ClientTimeout(total=20)) as resp:
            raw = await resp.read()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return f"connection error ({type(exc).__name__})"
    code = ""
    try:
        err = json.loads(raw).get("error")
        if isinstance(err, dict):
            code = str(err.get("code", ""))
    except (ValueError, AttributeError):
        pass
    return f"{resp.status} {code}".strip() if resp.status >= 400 else str(resp.status)


def v1(t: Target, doc: object, *, route: str = "classify", **kw: Any) -> Callable[[], Awaitable[str]]:
    return lambda: http_call(t, "POST", f"/v1/{route}", json_doc=doc, **kw)


def v2_infer(t: Target, doc: dict[str, Any], binary: bytes = b"", *, model: str | None = None,
             version: str = "", header_length: int | None = None) -> Callable[[], Awaitable[str]]:
    head = json.dumps(doc).encode()
    path = f"/v2/models/{model or t.classifier}" + (f"/versions/{version}" if version else "") + "/infer"
    headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
    if binary or header_length is not None:
        headers["Inference-Header-Content-Length"] = str(len(head) if header_length is None else header_length)
    return lambda: http_call(t, "POST", path, body=head + binary, headers=headers)


def v2_doc(images: list[bytes], *, datatype: str = "BYTES", shape: list[int] | None = None,
           name: str = "image", outputs: list[dict[str, Any]] | None = None,
           parameters: dict[str, Any] | None = None, size: int | None = None) -> tuple[dict[str, Any], bytes]:
    """A v2 request carrying ``images`` in the binary extension (length-prefixed BYTES elements)."""
    binary = b"".join(struct.pack("<I", len(i)) + i for i in images)
    tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape or [len(images)],
                              "parameters": {"binary_data_size": len(binary) if size is None else size}}
    doc: dict[str, Any] = {"inputs": [tensor]}
    if outputs is not None:
        doc["outputs"] = outputs
    if parameters is not None:
        doc["parameters"] = parameters
    return doc, binary


async def grpc_call(t: Target, method: str, payload: bytes, timeout: float = 10.0) -> str:
    try:
        await t.channel.unary_unary(method)(payload, timeout=timeout)
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


def classify(t: Target, request: pb.ClassifyRequest, timeout: float = 10.0) -> Callable[[], Awaitable[str]]:
    return lambda: grpc_call(t, "/imgserve.v1.ImageService/Classify", request.SerializeToString(), timeout)


def detect(t: Target, request: pb.DetectRequest) -> Callable[[], Awaitable[str]]:
    return lambda: grpc_call(t, "/imgserve.v1.ImageService/Detect", request.SerializeToString())


def model_infer(t: Target, images: list[bytes], *, datatype: str = "BYTES", raw: bytes | None = None,
                version: str = "", outputs: tuple[str, ...] = ()) -> Callable[[], Awaitable[str]]:
    request = v2.ModelInferRequest(model_name=t.classifier, model_version=version)
    request.inputs.add(name="image", datatype=datatype, shape=[len(images)])
    request.raw_input_contents.append(raw if raw is not None else
                                      b"".join(struct.pack("<I", len(i)) + i for i in images))
    for name in outputs:
        request.outputs.add(name=name)
    return lambda: grpc_call(t, "/inference.GRPCInferenceService/ModelInfer", request.SerializeToString())


async def raw_http(port: int, data: bytes) -> str:
    """The status of the first response to ``data`` sent on a fresh socket ("closed" if none)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 10)
    except (ConnectionError, asyncio.TimeoutError) as exc:
        return f"closed ({type(exc).__name__})"
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass
    parts = line.split()
    return parts[1].decode() if len(parts) >= 2 else "closed"


# ---------------------------------------------------------------- the cases

def cases(t: Target) -> list[tuple[str, str, str, Callable[[], Awaitable[str]]]]:
    """(kind, door, expected, send) for every kind of bad request (plus a few edges that must succeed)."""
    c, d = t.classifier, t.detector
    good = b64(GOOD)
    over_body = b'{"model": "' + c.encode() + b'", "images": ["' + b"A" * (MAX_MESSAGE_MB << 20) + b'"]}'
    budget = png(900, 900)                 # 0.81 MP each: under the image limit, 3 of them over the request budget
    out: list[tuple[str, str, str, Callable[[], Awaitable[str]]]] = [
        # ---- HTTP imgserve.v1 bodies
        ("empty body", "HTTP v1", "400 INVALID_ARGUMENT",
         lambda: http_call(t, "POST", "/v1/classify", body=b"", headers={"Content-Type": "application/json"})),
        ("not JSON", "HTTP v1", "400 INVALID_ARGUMENT",
         lambda: http_call(t, "POST", "/v1/classify", body=b"{model: tiny", headers={"Content-Type": "application/json"})),
        ("JSON array body", "HTTP v1", "400 INVALID_ARGUMENT", v1(t, [c, good])),
        ("body not UTF-8", "HTTP v1", "400 INVALID_ARGUMENT",
         lambda: http_call(t, "POST", "/v1/classify", body=b"\xff\xfe{}", headers={"Content-Type": "application/json"})),
        ("wrong Content-Type (text/plain)", "HTTP v1", "415 INVALID_ARGUMENT",
         lambda: http_call(t, "POST", "/v1/classify", body=json.dumps({"model": c, "images": [good]}).encode(),
                           headers={"Content-Type": "text/plain"})),
        (f"body over --max-message-mb {MAX_MESSAGE_MB}", "HTTP v1", "413 RESOURCE_EXHAUSTED",
         lambda: http_call(t, "POST", "/v1/classify", body=over_body, headers={"Content-Type": "application/json"})),
        ("images not a list", "HTTP v1", "400 INVALID_ARGUMENT", v1(t, {"model": c, "images": good})),
        ("unknown field", "HTTP v1", "400 INVALID_ARGUMENT", v1(t, {"model": c, "images": [good], "bogus": 1})),
        ("base64 garbage", "HTTP v1", "400 INVALID_ARGUMENT", v1(t, {"model": c, "images": ["!!not*base64!!"]})),
        ("valid base64, not an image", "HTTP v1", "400 INVALID_ARGUMENT",
         v1(t, {"model": c, "images": [b64(b"hello, this is no image")]})),
        ("truncated PNG", "HTTP v1", "400 INVALID_ARGUMENT", v1(t, {"model": c, "images": [b64(GOOD[:60])]})),
        ("PNG with a bad CRC", "HTTP v1", "400 INVALID_ARGUMENT", v1(t, {"model": c, "images": [b64(bad_crc_png())]})),
        # the request budget is checked first, from the headers, so the bomb is never inflated
        ("decompression bomb (30000x30000 of zeros)", "HTTP v1", "413 RESOURCE_EXHAUSTED",
         v1(t, {"model": c, "images": [b64(bomb_png())]})),
        (f"image over --max-image-pixels {MAX_IMAGE_PIXELS:,} (1100x1100)", "HTTP v1", "400 INVALID_ARGUMENT",
         v1(t, {"model": c, "images": [b64(png(1100, 1100))]})),
        ("0x0 image", "HTTP v1", "400 INVALID_ARGUMENT", v1(t, {"model": c, "images": [b64(raw_png(0, 0))]})),
        ("extreme aspect ratio (1x20000)", "HTTP v1", "200", v1(t, {"model": c, "images": [b64(png(20000, 1))]})),
        (f"too many images ({MAX_IMAGES + 1})", "HTTP v1", "400 INVALID_ARGUMENT",
         v1(t, {"model": c, "images": [good] * (MAX_IMAGES + 1)})),
        ("no images", "HTTP v1", "400 INVALID_ARGUMENT", v1(t, {"model": c, "images": []})),
        (f"request pixels over --max-request-pixels ({3 * 900 * 900:,})", "HTTP v1", "413 RESOURCE_EXHAUSTED",
         v1(t, {"model": c, "images": [b64(budget)] * 3})),
        ("unknown model", "HTTP v1", "404 NOT_FOUND", v1(t, {"model": "no-such-model", "images": [good]})),
        ("empty model name", "HTTP v1", "400 INVALID_ARGUMENT", v1(t, {"model": "", "images": [good]})),
        ("topK 0 (named explicitly)", "HTTP v1", "400 INVALID_ARGUMENT", v1(t, {"model": c, "images": [good], "topK": 0})),
        ("topK negative", "HTTP v1", "400 INVALID_ARGUMENT", v1(t, {"model": c, "images": [good], "topK": -3})),
        ("topK huge (capped at the class count)", "HTTP v1", "200",
         v1(t, {"model": c, "images": [good], "topK": 2_000_000_000})),
        ("topK not an integer", "HTTP v1", "400 INVALID_ARGUMENT", v1(t, {"model": c, "images": [good], "topK": "ten"})),
        ("Detect on a classifier", "HTTP v1", "400 INVALID_ARGUMENT", v1(t, {"model": c, "images": [good]}, route="detect")),
        ("Classify on a detector", "HTTP v1", "400 INVALID_ARGUMENT", v1(t, {"model": d, "images": [good]})),
        ("X-Request-Timeout garbage", "HTTP v1", "400 INVALID_ARGUMENT",
         v1(t, {"model": c, "images": [good]}, headers={"X-Request-Timeout": "soon"})),
        ("X-Request-Timeout negative", "HTTP v1", "400 INVALID_ARGUMENT",
         v1(t, {"model": c, "images": [good]}, headers={"X-Request-Timeout": "-1"})),
        ("deadline already expired (X-Request-Timeout 1e-9)", "HTTP v1", "504 DEADLINE_EXCEEDED",
         v1(t, {"model": c, "images": [good]}, headers={"X-Request-Timeout": "0.000000001"})),
        # ---- HTTP routes and the wire
        ("unknown route", "HTTP", "404 NOT_FOUND", lambda: http_call(t, "GET", "/v1/nothing-here")),
        ("wrong method (GET /v1/classify)", "HTTP", "405 UNIMPLEMENTED", lambda: http_call(t, "GET", "/v1/classify")),
        ("path traversal in the model name", "HTTP", "404",
         lambda: http_call(t, "GET", "/v2/models/..%2F..%2Fetc%2Fpasswd")),
        ("HTTP/1.0 without Host", "socket", "200", lambda: raw_http(t.http_port, b"GET /healthz HTTP/1.0\r\n\r\n")),
        ("header flood (200 headers of 8 KB)", "socket", "400",
         lambda: raw_http(t.http_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                          + b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 8000) for i in range(200)) + b"\r\n")),
        ("garbage request line", "socket", "400", lambda: raw_http(t.http_port, b"\x16\x03\x01\x02\x00\x01\x00\r\n\r\n")),
        ("Content-Length lies (says 10, sends 2, closes)", "socket", "closed (nothing answered)",
         lambda: _short_body(t.http_port)),
        # ---- HTTP v2 (Open Inference Protocol)
        ("v2: wrong datatype (FP32)", "HTTP v2", "400", v2_infer(t, *v2_doc([GOOD], datatype="FP32"))),
        ("v2: wrong shape [1, 2]", "HTTP v2", "400", v2_infer(t, *v2_doc([GOOD], shape=[1, 2]))),
        ("v2: shape says 3, carries 1", "HTTP v2", "400", v2_infer(t, *v2_doc([GOOD], shape=[3]))),
        ("v2: missing input", "HTTP v2", "400", v2_infer(t, {"inputs": []})),
        ("v2: unknown input name", "HTTP v2", "400", v2_infer(t, *v2_doc([GOOD], name="pixels"))),
        ("v2: BYTES length prefix overruns the data", "HTTP v2", "400",
         v2_infer(t, v2_doc([GOOD])[0] | {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                                       "parameters": {"binary_data_size": 10}}]},
                  struct.pack("<I", 1000) + b"\x89PNG\r\n")),
        ("v2: binary_data_size differs from the body", "HTTP v2", "400", v2_infer(t, *v2_doc([GOOD], size=5))),
        ("v2: Inference-Header-Content-Length beyond the body", "HTTP v2", "400",
         v2_infer(t, *v2_doc([GOOD]), header_length=10**6)),
        ("v2: unknown output", "HTTP v2", "400", v2_infer(t, *v2_doc([GOOD], outputs=[{"name": "logits"}]))),
        ("v2: classification count negative", "HTTP v2", "400",
         v2_infer(t, *v2_doc([GOOD], outputs=[{"name": "probabilities", "parameters": {"classification": -2}}]))),
        ("v2: unknown version", "HTTP v2", "404", v2_infer(t, *v2_doc([GOOD]), version="99")),
        ("v2: unknown model", "HTTP v2", "404", v2_infer(t, *v2_doc([GOOD]), model="no-such-model")),
        ("v2: timeout parameter not a number", "HTTP v2", "400",
         v2_infer(t, *v2_doc([GOOD], parameters={"timeout": "soon"}))),
        ("v2: timeout parameter negative", "HTTP v2", "400",
         v2_infer(t, *v2_doc([GOOD], parameters={"timeout": -5}))),
        ("v2: parameters not an object", "HTTP v2", "400", v2_infer(t, *v2_doc([GOOD], parameters=True))),  # type: ignore[arg-type]
        # ---- gRPC
        ("gRPC: malformed protobuf to Classify", "gRPC", "INVALID_ARGUMENT",
         lambda: grpc_call(t, "/imgserve.v1.ImageService/Classify", b"\x0a\xff\xff\xff\xff\x0f")),
        ("gRPC: malformed protobuf to ModelInfer", "gRPC", "INVALID_ARGUMENT",
         lambda: grpc_call(t, "/inference.GRPCInferenceService/ModelInfer", b"\x12\x05ab")),
        (f"gRPC: message over --max-message-mb {MAX_MESSAGE_MB}", "gRPC", "RESOURCE_EXHAUSTED",
         classify(t, pb.ClassifyRequest(model=c, images=[b"\x00" * ((MAX_MESSAGE_MB << 20) + 1024)]))),
        ("gRPC: unknown model", "gRPC", "NOT_FOUND", classify(t, pb.ClassifyRequest(model="no-such-model", images=[GOOD]))),
        ("gRPC: empty model name", "gRPC", "INVALID_ARGUMENT", classify(t, pb.ClassifyRequest(model="", images=[GOOD]))),
        ("gRPC: no images", "gRPC", "INVALID_ARGUMENT", classify(t, pb.ClassifyRequest(model=c))),
        ("gRPC: top_k negative", "gRPC", "INVALID_ARGUMENT", classify(t, pb.ClassifyRequest(model=c, images=[GOOD], top_k=-1))),
        ("gRPC: not an image", "gRPC", "INVALID_ARGUMENT", classify(t, pb.ClassifyRequest(model=c, images=[b"\x00" * 64]))),
        ("gRPC: decompression bomb", "gRPC", "RESOURCE_EXHAUSTED", classify(t, pb.ClassifyRequest(model=c, images=[bomb_png()]))),
        ("gRPC: top_k 0 (set explicitly; optional field)", "gRPC", "INVALID_ARGUMENT",
         classify(t, pb.ClassifyRequest(model=c, images=[GOOD], top_k=0))),
        ("gRPC: top_k huge (capped at the class count)", "gRPC", "OK",
         classify(t, pb.ClassifyRequest(model=c, images=[GOOD], top_k=2_000_000_000))),
        ("gRPC: request pixels over budget", "gRPC", "RESOURCE_EXHAUSTED",
         classify(t, pb.ClassifyRequest(model=c, images=[budget] * 3))),
        ("gRPC: Detect on a classifier", "gRPC", "INVALID_ARGUMENT", detect(t, pb.DetectRequest(model=c, images=[GOOD]))),
        ("gRPC: Classify on a detector", "gRPC", "INVALID_ARGUMENT", classify(t, pb.ClassifyRequest(model=d, images=[GOOD]))),
        ("gRPC: unknown method", "gRPC", "UNIMPLEMENTED", lambda: grpc_call(t, "/imgserve.v1.ImageService/Nope", b"")),
        ("gRPC v2: wrong datatype", "gRPC", "INVALID_ARGUMENT", model_infer(t, [GOOD], datatype="UINT8")),
        ("gRPC v2: BYTES length prefix overrun", "gRPC", "INVALID_ARGUMENT",
         model_infer(t, [GOOD], raw=struct.pack("<I", 1 << 30) + b"\x89PNG")),
        ("gRPC v2: unknown version", "gRPC", "NOT_FOUND", model_infer(t, [GOOD], version="99")),
        ("gRPC v2: unknown output", "gRPC", "INVALID_ARGUMENT", model_infer(t, [GOOD], outputs=("logits",))),
    ]
    return out


async def _short_body(port: int) -> str:
    """Send a head promising 10 body bytes, send 2, half-close: the server must just drop it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10\r\n\r\n{}")
        await writer.drain()
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), 10)
    except (ConnectionError, asyncio.TimeoutError) as exc:
        return f"closed ({type(exc).__name__})"
    finally:
        writer.close()
    return "closed (nothing answered)" if not data else data.split(b"\r\n", 1)[0].decode(errors="replace")


# ---------------------------------------------------------------- running it

async def _answers(t: Target) -> bool:
    """A good request still gets its answer (the process is not merely alive but serving)."""
    return await grpc_call(t, "/imgserve.v1.ImageService/Classify",
                           pb.ClassifyRequest(model=t.classifier, images=[GOOD], top_k=1).SerializeToString()) == "OK"


async def _warm_up(t: Target) -> None:
    """Every good path once, so lazy imports and first-use buffers are in the baseline."""
    assert await _answers(t)
    assert await http_call(t, "POST", "/v1/classify", json_doc={"model": t.classifier, "images": [b64(GOOD)]}) == "200"
    assert await http_call(t, "POST", "/v1/detect", json_doc={"model": t.detector, "images": [b64(GOOD)]}) == "200"
    assert await v2_infer(t, *v2_doc([GOOD]))() == "200"
    assert await model_infer(t, [GOOD])() == "OK"


def battery_repository(repo: Path) -> tuple[str, str]:
    """A tiny classifier and a tiny detector in ``repo`` (real ONNX files); returns their names."""
    from benchmarks.reliability.tinymodel import add_detector, add_version
    from tests.fakes import tiny_detector_spec, tiny_spec

    if not (repo / "tiny").exists():
        add_version(repo, tiny_spec("tiny"))
    if not (repo / "tinydet").exists():
        add_detector(repo, tiny_detector_spec("tinydet"))
    return "tiny", "tinydet"


async def hostile_battery(repo: Path | None = None, *, classifier: str | None = None,
                          repeats: int = 1) -> dict[str, Any]:
    """Run every case ``repeats`` times against one real gateway; rows of the first round, crashes, RSS.

    ``repo`` (default: a temporary one) gets the tiny detector added; ``classifier`` names the
    classifier to aim at (default: the tiny one added too). Later rounds only repeat the cases,
    to show that memory does not grow with the number of bad requests.
    """
    from benchmarks.reliability.figures import rss_mb
    from tests.procs import run_gateway

    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(repo) if repo is not None else Path(tmp)
        tiny, detector = battery_repository(repo)
        classifier = classifier or tiny
        rows: list[Row] = []
        crashes = 0
        began = time.monotonic()
        with run_gateway(repo, extra_args=GATEWAY_ARGS) as gw:
            pid = gw.proc.pid
            big = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
            async with aiohttp.ClientSession() as session, \
                    grpc.aio.insecure_channel(gw.grpc_target, options=big) as channel:
                t = Target(grpc=gw.grpc_target, http=gw.http_url, http_port=int(gw.http_url.rsplit(":", 1)[1]),
                           classifier=classifier, detector=detector, session=session, channel=channel)
                battery_began = time.monotonic()
                await _warm_up(t)
                await asyncio.sleep(0.5)
                baseline = rss_mb(pid)
                peak = baseline
                for round_ in range(repeats):
                    for kind, door, expected, send in cases(t):
                        start = time.perf_counter()
                        got = await send()
                        ms = (time.perf_counter() - start) * 1000
                        alive = gw.alive() and await _answers(t)
                        if not alive:
                            crashes += 1
                        if gw.alive():
                            peak = max(peak, rss_mb(pid))
                        if round_ == 0:
                            rows.append(Row(kind, door, expected, got, alive, ms))
                        if not gw.alive():
                            break
                    if not gw.alive():
                        break
                await asyncio.sleep(1.0)
                after = rss_mb(pid) if gw.alive() else float("nan")
                alive_at_end = gw.alive()
            log = gw.stderr()
        started_s = round(battery_began - began, 1)
    lines = log.splitlines()
    tracebacks = [" | ".join(lines[max(0, i - 1):i + 1] + lines[i + 1:][-1:]) for i, line in enumerate(lines)
                  if line.startswith("Traceback")]
    return {"rows": rows, "kinds": len(rows), "as_expected": sum(r.ok for r in rows), "repeats": repeats,
            "requests": len(rows) * repeats, "crashes": crashes, "alive_at_end": alive_at_end,
            "exit_code_after_sigterm": gw.proc.returncode,
            "rss_mb_baseline": round(baseline, 1), "rss_mb_peak": round(peak, 1), "rss_mb_after": round(after, 1),
            "rss_margin_mb": RSS_MARGIN_MB, "tracebacks_in_log": len(tracebacks),
            "error_lines_in_log": sum(1 for line in lines if " ERROR " in line),
            "traceback_lines": tracebacks[:5], "gateway_start_s": started_s,
            "seconds": round(time.monotonic() - began, 1)}


def table(result: dict[str, Any]) -> str:
    """The markdown table docs/reliability.md holds."""
    lines = ["| # | kind | door | expected | got | alive and answering | ms |", "|---:|---|---|---|---|---|---:|"]
    for i, r in enumerate(result["rows"], 1):
        mark = "" if r.ok else " **(!)**"
        lines.append(f"| {i} | {r.kind} | {r.door} | {r.expected} | {r.got}{mark} | {'yes' if r.alive else '**no**'} "
                     f"| {r.ms:.0f} |")
    return "\n".join(lines)


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The result without the rows, as JSON (the figures script prints this)."""
    out = {k: v for k, v in result.items() if k != "rows"}
    out["unexpected"] = [f"{r.kind}: expected {r.expected}, got {r.got}, alive {r.alive}"
                         for r in result["rows"] if not r.ok]
    return out


if __name__ == "__main__":
    import sys

    outcome = asyncio.run(hostile_battery(repeats=int(sys.argv[1]) if len(sys.argv) > 1 else 1))
    print(table(outcome))
    print()
    print(json.dumps(summary(outcome), indent=2))
