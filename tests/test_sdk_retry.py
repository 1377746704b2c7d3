"""SDK retries: what is retried, how long it waits, and that it never outlives the caller's deadline.

Fake servers fail on purpose a scripted number of times: a gRPC ImageService that answers
UNAVAILABLE / RESOURCE_EXHAUSTED (with or without a ``retry-after`` trailer) before it
succeeds, and a raw HTTP server replaying a list of answers. The policy's arithmetic
(full jitter, the retry budget) is checked without any server.
"""
from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import grpc.aio
import pytest

from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from clients.proto.imgserve.v1 import imgserve_pb2_grpc as pb_grpc
from clients.sdk import (AsyncImageClient, ImageClient, InvalidArgument, ResourceExhausted, RetryPolicy,
                         Unavailable)
from clients.sdk.errors import ImgserveError
from clients.sdk.retry import RetryBudget, Retrier, is_retryable

pytestmark = pytest.mark.timeout(60)

IMAGE = b"\x89PNG not decoded by the fakes"
FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=2.0)  # waits 0.01, 0.02, 0.04
OK_JSON = json.dumps({"model": "m", "modelVersion": "1",
                      "results": [{"classes": [{"index": 1, "label": "one", "score": 1.0}]}]}).encode()


# ---------------------------------------------------------------- policy arithmetic

def test_full_jitter_stays_under_the_exponential_cap() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0)
    rng = random.Random(7)
    for n, cap in ((1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)):
        draws = [policy.backoff(n, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in draws) and max(draws) > cap * 0.8


def test_retry_budget_caps_retries_at_a_tenth_of_calls_plus_the_floor() -> None:
    retrier = Retrier(RetryPolicy(max_attempts=5, initial_backoff_s=0, budget_ratio=0.1, budget_floor=10))
    retries = 0
    for _ in range(1000):  # every call fails UNAVAILABLE on every attempt
        state = retrier.start(None)
        state.remaining()
        while state.delay_before_retry(Unavailable("down")) is not None:
            retries += 1
            state.remaining()
    assert retries <= 10 + 0.1 * 1000 and retries >= 0.1 * 1000 - 1


def test_what_is_retried() -> None:
    assert is_retryable(Unavailable("down"))
    assert is_retryable(ResourceExhausted("queue full", retry_after=1.0))
    assert not is_retryable(ResourceExhausted("message larger than max"))  # no retry-after: size limit
    assert not is_retryable(Unavailable("wrong port", permanent=True))
    for code in ("INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED", "DEADLINE_EXCEEDED", "INTERNAL"):
        assert not is_retryable(ImgserveError("x", code=code)), code
    assert RetryPolicy.of(0).max_attempts == 1 and RetryPolicy.of(None).max_attempts == 1
    assert RetryPolicy.of(2).max_attempts == 3
    with pytest.raises(ValueError):
        RetryPolicy.of(-1)


# ---------------------------------------------------------------- gRPC

class FlakyService(pb_grpc.ImageServiceServicer):
    """Fails the first ``failures`` Classify calls with ``code`` (and a retry-after trailer when given)."""

    def __init__(self, failures: int, code: grpc.StatusCode, retry_after: str | None = None) -> None:
        self.failures = failures
        self.code = code
        self.retry_after = retry_after
        self.calls: list[float] = []

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.failures:
            if self.retry_after is not None:
                context.set_trailing_metadata((("retry-after", self.retry_after),))
            await context.abort(self.code, "scripted failure")
        return pb.ClassifyResponse(model="m", model_version="1",
                                   results=[pb.Classification(classes=[pb.ClassScore(index=1, label="one", score=1)])])


async def _serve(service: FlakyService) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    pb_grpc.add_ImageServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
async def test_unavailable_is_retried_until_it_succeeds(is_async: bool) -> None:
    service = FlakyService(2, grpc.StatusCode.UNAVAILABLE)
    server, target = await _serve(service)
    try:
        if is_async:
            async with AsyncImageClient(target, retries=FAST, timeout=10) as client:
                result = await client.classify(IMAGE, "m")
        else:
            def call() -> object:
                with ImageClient(target, retries=FAST, timeout=10) as client:
                    return client.classify(IMAGE, "m")
            result = await asyncio.to_thread(call)
        assert result.top1[0].label == "one" and len(service.calls) == 3  # type: ignore[attr-defined]
    finally:
        await server.stop(0)


async def test_grpc_retry_after_trailer_is_honoured() -> None:
    service = FlakyService(1, grpc.StatusCode.RESOURCE_EXHAUSTED, retry_after="0.3")
    server, target = await _serve(service)
    try:
        async with AsyncImageClient(target, retries=FAST, timeout=10) as client:
            await client.classify(IMAGE, "m")
        assert len(service.calls) == 2 and service.calls[1] - service.calls[0] >= 0.3
    finally:
        await server.stop(0)


async def test_no_retry_for_other_codes_or_when_disabled() -> None:
    service = FlakyService(1, grpc.StatusCode.INVALID_ARGUMENT)
    server, target = await _serve(service)
    try:
        async with AsyncImageClient(target, retries=FAST, timeout=10) as client:
            with pytest.raises(InvalidArgument):
                await client.classify(IMAGE, "m")
        assert len(service.calls) == 1
        service.failures, service.code, service.calls = 5, grpc.StatusCode.UNAVAILABLE, []
        async with AsyncImageClient(target, retries=0, timeout=10) as client:
            with pytest.raises(Unavailable) as info:
                await client.classify(IMAGE, "m")
        assert len(service.calls) == 1 and info.value.attempts == 1
        service.calls = []
        async with AsyncImageClient(target, retries=FAST, timeout=10) as client:
            with pytest.raises(Unavailable) as info:
                await client.classify(IMAGE, "m")
        assert len(service.calls) == 4 and info.value.attempts == 4
    finally:
        await server.stop(0)


async def test_retries_stop_at_the_callers_deadline() -> None:
    service = FlakyService(10**6, grpc.StatusCode.UNAVAILABLE)
    server, target = await _serve(service)
    slow = RetryPolicy(max_attempts=100, initial_backoff_s=0.2, max_backoff_s=0.2, budget_floor=100)
    try:
        async with AsyncImageClient(target, retries=slow, timeout=0.5) as client:
            start = time.monotonic()
            with pytest.raises(Unavailable):
                await client.classify(IMAGE, "m")
            assert time.monotonic() - start < 0.6
        # a Retry-After beyond the policy's longest wait is handed to the caller at once
        service.retry_after, service.code, service.calls = "30", grpc.StatusCode.RESOURCE_EXHAUSTED, []
        async with AsyncImageClient(target, retries=FAST, timeout=10) as client:
            with pytest.raises(ResourceExhausted) as info:
                await client.classify(IMAGE, "m")
        assert len(service.calls) == 1 and info.value.retry_after == 30.0
    finally:
        await server.stop(0)


# ---------------------------------------------------------------- HTTP

@contextmanager
def replaying_http_server(replies: list[bytes]) -> Iterator[tuple[str, list[float]]]:
    """Answer the n-th request with replies[n] (the last one forever after), one connection each."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.05)
    stop = threading.Event()
    seen: list[float] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length")), 0)
                while len(body) < length:
                    body += conn.recv(65536)
                seen.append(time.monotonic())
                conn.sendall(replies[min(len(seen), len(replies)) - 1])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", seen
    finally:
        stop.set()
        thread.join(timeout=10)
        listener.close()


def _reply(status: str, body: bytes, headers: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n{headers}\r\n").encode() + body


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_http_503_then_429_with_retry_after_then_success(is_async: bool) -> None:
    busy = json.dumps({"error": {"code": "RESOURCE_EXHAUSTED", "message": "queue full"}}).encode()
    down = json.dumps({"error": {"code": "UNAVAILABLE", "message": "draining"}}).encode()
    replies = [_reply("503 Service Unavailable", down), _reply("429 Too Many Requests", busy, "Retry-After: 1\r\n"),
               _reply("200 OK", OK_JSON)]
    with replaying_http_server(replies) as (url, seen):
        if is_async:
            async def run() -> object:
                async with AsyncImageClient(url, retries=FAST, timeout=10) as client:
                    return await client.classify(IMAGE, "m")
            result = asyncio.run(run())
        else:
            with ImageClient(url, retries=FAST, timeout=10) as client:
                result = client.classify(IMAGE, "m")
    assert result.top1[0].label == "one" and len(seen) == 3  # type: ignore[attr-defined]
    assert seen[2] - seen[1] >= 1.0  # Retry-After: 1 was honoured
