"""The SDK against servers that misbehave on purpose: every failure is a typed ImgserveError.

A tiny raw HTTP server (a thread on 127.0.0.1, port 0) answers each request with
scripted bytes: garbage, a wrong result count, a bad Retry-After, or a response cut
off mid-body. A fake gRPC ImageService does the same for the gRPC transport.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import grpc.aio
import pytest

from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from clients.proto.imgserve.v1 import imgserve_pb2_grpc as pb_grpc
from clients.sdk import AsyncImageClient, ImageClient, ImgserveError, InternalError, ResourceExhausted, Unavailable
from clients.sdk.errors import from_grpc, from_http, parse_retry_after

pytestmark = pytest.mark.timeout(60)

TWO_IMAGES = [b"\x89PNG first", b"\x89PNG second"]   # sent as bytes, untouched; the fake never decodes them
ONE_RESULT = json.dumps({"model": "m", "modelVersion": "1",
                         "results": [{"classes": [{"index": 3, "label": "3", "score": 0.9}]}]}).encode()


def http_response(status: str, body: bytes, headers: dict[str, str] | None = None,
                  declared_length: int | None = None) -> bytes:
    head = [f"HTTP/1.1 {status}", "Content-Type: application/json",
            f"Content-Length: {len(body) if declared_length is None else declared_length}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@contextmanager
def scripted_http_server(reply: bytes | None) -> Iterator[str]:
    """Answer every request with ``reply`` verbatim, then close (None: close without a word).

    Yields the base URL. The request is read fully first, so the client is never cut off mid-send.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.05)   # accept() wakes up to notice the stop
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(20)
            with conn:
                _read_request(conn)
                if reply is not None:
                    conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=10)
        listener.close()


def _read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return
        body += chunk


def call_classify(url: str, is_async: bool) -> object:
    if is_async:
        async def run() -> object:
            async with AsyncImageClient(url, timeout=20) as client:
                return await client.classify(TWO_IMAGES, "m")
        return asyncio.run(run())
    with ImageClient(url, timeout=20) as client:
        return client.classify(TWO_IMAGES, "m")


CLIENT_KINDS = pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])


# ---------------------------------------------------------------- HTTP

@CLIENT_KINDS
def test_unreadable_body_is_internal_error(is_async: bool) -> None:
    with scripted_http_server(http_response("200 OK", b"<html>not the gateway</html>")) as url:
        with pytest.raises(InternalError, match="unreadable ClassifyResponse") as info:
            call_classify(url, is_async)
    assert info.value.code == "INTERNAL" and "not the gateway" in info.value.message


@CLIENT_KINDS
def test_fewer_results_than_images_is_internal_error(is_async: bool) -> None:
    """Results are matched to images by position: one result for two images must never pass as an answer."""
    with scripted_http_server(http_response("200 OK", ONE_RESULT)) as url:
        with pytest.raises(InternalError, match="1 results for 2 images"):
            call_classify(url, is_async)


@CLIENT_KINDS
@pytest.mark.parametrize("header", ["soon", "-3", "Wed, 21 Oct 2026 07:28:00 GMT", ""])
def test_bad_retry_after_still_gives_resource_exhausted(is_async: bool, header: str) -> None:
    body = json.dumps({"error": {"code": "RESOURCE_EXHAUSTED", "message": "queue is full"}}).encode()
    reply = http_response("429 Too Many Requests", body, {"Retry-After": header})
    with scripted_http_server(reply) as url:
        with pytest.raises(ResourceExhausted) as info:
            call_classify(url, is_async)
    assert info.value.message == "queue is full" and info.value.retry_after is None


@CLIENT_KINDS
def test_good_retry_after_is_read(is_async: bool) -> None:
    body = json.dumps({"error": {"code": "RESOURCE_EXHAUSTED", "message": "queue is full"}}).encode()
    with scripted_http_server(http_response("429 Too Many Requests", body, {"Retry-After": "7"})) as url:
        with pytest.raises(ResourceExhausted) as info:
            call_classify(url, is_async)
    assert info.value.retry_after == 7.0


@CLIENT_KINDS
def test_connection_dropped_mid_response_is_unavailable(is_async: bool) -> None:
    """Headers promise 2000 bytes; 40 arrive, then the connection closes."""
    reply = http_response("200 OK", ONE_RESULT[:40], declared_length=2000)
    with scripted_http_server(reply) as url:
        with pytest.raises(Unavailable) as info:
            call_classify(url, is_async)
    assert info.value.code == "UNAVAILABLE"


@CLIENT_KINDS
def test_connection_closed_before_any_response_is_unavailable(is_async: bool) -> None:
    with scripted_http_server(None) as url:
        with pytest.raises(Unavailable):
            call_classify(url, is_async)


@CLIENT_KINDS
def test_error_status_with_unreadable_body_keeps_the_status_meaning(is_async: bool) -> None:
    with scripted_http_server(http_response("503 Service Unavailable", b"upstream connect error")) as url:
        with pytest.raises(Unavailable, match="HTTP 503: upstream connect error"):
            call_classify(url, is_async)


def test_retry_after_parsing() -> None:
    assert parse_retry_after("2.5") == 2.5 and parse_retry_after(b" 3 ") == 3.0 and parse_retry_after("0") == 0.0
    for bad in (None, "", "soon", "-1", b"\xff", "Wed, 21 Oct 2026 07:28:00 GMT"):
        assert parse_retry_after(bad) is None, bad
    assert from_http(429, b"", {"Retry-After": "x"}).retry_after is None
    assert from_grpc("RESOURCE_EXHAUSTED", "busy", {"retry-after": b"x"}).retry_after is None


# ---------------------------------------------------------------- gRPC

class MisbehavingImageService(pb_grpc.ImageServiceServicer):
    """Answers Classify with one result whatever was sent, or aborts with a bad retry-after trailer."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        if self.mode == "overloaded":
            context.set_trailing_metadata((("retry-after", "later"),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full")
        return pb.ClassifyResponse(model="m", model_version="1",
                                   results=[pb.Classification(classes=[pb.ClassScore(index=1, label="1", score=1)])])


@CLIENT_KINDS
@pytest.mark.parametrize("mode", ["miscount", "overloaded"])
def test_grpc_misbehaviour_is_typed(is_async: bool, mode: str) -> None:
    async def run() -> None:
        server = grpc.aio.server()
        pb_grpc.add_ImageServiceServicer_to_server(MisbehavingImageService(mode), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            # the sync client blocks: run it in a thread while this loop serves
            await asyncio.to_thread(grpc_classify_checked, f"127.0.0.1:{port}", is_async, mode)
        finally:
            await server.stop(0)

    asyncio.run(run())


def grpc_classify_checked(target: str, is_async: bool, mode: str) -> None:
    with pytest.raises(ImgserveError) as info:
        call_classify(target, is_async)         # a host:port target means gRPC
    if mode == "miscount":
        assert type(info.value) is InternalError and "1 results for 2 images" in info.value.message
    else:
        assert type(info.value) is ResourceExhausted and info.value.retry_after is None
