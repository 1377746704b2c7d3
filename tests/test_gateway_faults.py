"""Faults the real engines cannot produce on demand, through the real gateway servers in process.

A ScriptedBackend (tests/fakes.py) stands in for ONNX Runtime / Triton: it can hang
or raise something unexpected while the gateway serves.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import time

import aiohttp
import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from clients.proto.imgserve.v1 import imgserve_pb2_grpc as pb_grpc
from serving import app
from serving.app import Gateway
from serving.errors import BackendError
from serving.transports.grpc_util import INTERNAL_MESSAGE
from tests.fakes import (ScriptedBackend, gateway_settings, grey_png, grpc_target, http_url, running_gateway,
                         tiny_spec, until)

pytestmark = pytest.mark.timeout(120)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SECRET = "/srv/secret/weights.onnx line 42"   # what an internal exception might say; never for clients


async def classify(target: str, values: list[int], timeout: float = 30.0) -> pb.ClassifyResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ImageServiceStub(channel)
        return await stub.Classify(pb.ClassifyRequest(model="tiny", images=[grey_png(v) for v in values], top_k=1),
                                   timeout=timeout)


async def http_classify(base: str, values: list[int]) -> tuple[int, dict]:
    body = {"model": "tiny", "images": [base64.b64encode(grey_png(v)).decode() for v in values], "topK": 1}
    async with aiohttp.ClientSession() as session, session.post(f"{base}/v1/classify", json=body) as resp:
        return resp.status, json.loads(await resp.read())


def top1(response: pb.ClassifyResponse) -> list[int]:
    return [r.classes[0].index for r in response.results]


# ---------------------------------------------------------------- unexpected exceptions -> INTERNAL

@pytest.mark.parametrize("where", ["models", "infer"])
async def test_unexpected_exception_is_a_generic_internal_error_and_serving_goes_on(where: str) -> None:
    backend = ScriptedBackend()
    async with running_gateway(backend) as gw:
        for transport in ("grpc", "http"):
            if where == "models":
                backend.models_error = KeyError(SECRET)
            else:
                backend.fail_with = RuntimeError(SECRET)
            if transport == "grpc":
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await classify(grpc_target(gw), [1])
                assert info.value.code() == grpc.StatusCode.INTERNAL
                details = info.value.details() or ""
            else:
                status, doc = await http_classify(http_url(gw), [1])
                assert status == 500 and doc["error"]["code"] == "INTERNAL"
                details = doc["error"]["message"]
            assert "secret" not in details.lower() and "RuntimeError" not in details and "KeyError" not in details
            assert details == INTERNAL_MESSAGE or "server log" in details, details
            backend.fail_with = None
            assert top1(await classify(grpc_target(gw), [1, 2, 3])) == [1, 2, 0]   # still serving
        errors = gw.metrics.sample("imgserve_request_errors_total",
                                   {"model": "tiny", "endpoint": "grpc.Classify", "code": "INTERNAL"})
        assert errors == 1


async def test_backend_error_raised_on_purpose_keeps_its_message() -> None:
    """A ServingError is client-safe by contract: its message reaches the client (only surprises are hidden)."""
    backend = ScriptedBackend()
    backend.fail_with = BackendError("model 'tiny' produced NaN")
    async with running_gateway(backend) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await classify(grpc_target(gw), [1])
    assert info.value.code() == grpc.StatusCode.INTERNAL and info.value.details() == "model 'tiny' produced NaN"


# ---------------------------------------------------------------- a gRPC deadline reaches the batcher

async def test_grpc_deadline_drops_a_queued_request_before_compute() -> None:
    """The client's gRPC deadline travels to the batcher: a request whose deadline passes while it waits
    behind a busy backend is answered DEADLINE_EXCEEDED and its crops are never computed."""
    backend = ScriptedBackend(tiny_spec(max_batch_size=1))
    backend.hold()
    async with running_gateway(backend, max_batch_size=1, request_timeout_s=3600.0) as gw:
        busy = asyncio.create_task(classify(grpc_target(gw), [7]))    # occupies the only execution slot
        await asyncio.wait_for(backend.entered.wait(), 30)
        batcher = gw.dataplane._batchers["tiny"][1]
        deadlines: list[float | None] = []
        submit = batcher.submit

        async def recording_submit(items, *, deadline=None):  # a spy: what deadline reached the batcher
            deadlines.append(deadline)
            return await submit(items, deadline=deadline)

        batcher.submit = recording_submit  # type: ignore[method-assign]
        sent = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await classify(grpc_target(gw), [1, 2], timeout=1.0)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        (deadline,) = deadlines                    # the client's 1 s, not the server's 3600 s default
        assert deadline is not None and sent < deadline < sent + 60   # wide: only 1 s vs 3600 s matters
        await until(lambda: batcher.depth == 0)   # its crops leave the queue while the backend is still held
        backend.release()
        assert top1(await busy) == [1]             # 7 % 3
        assert top1(await classify(grpc_target(gw), [5])) == [2]
    firsts = [int(b[0, 0, 0, 0]) for b in backend.batches_of("tiny")]
    assert firsts == [7, 5]                        # the late request's crops (1, 2) never reached the backend


# ---------------------------------------------------------------- drain edge cases

async def test_health_turns_not_serving_while_requests_still_drain() -> None:
    """A load balancer watching health sees NOT_SERVING as soon as the drain starts, while an
    accepted request is still being computed (and that request is then answered normally)."""
    backend = ScriptedBackend()
    backend.hold()
    async with running_gateway(backend, shutdown_grace_s=3600.0) as gw:
        async with grpc.aio.insecure_channel(grpc_target(gw)) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == SERVING
            in_flight = asyncio.create_task(classify(grpc_target(gw), [4]))
            await asyncio.wait_for(backend.entered.wait(), 30)
            stopping = asyncio.create_task(gw.stop())
            assert (await asyncio.wait_for(watch.read(), 30)).status == NOT_SERVING
            assert not in_flight.done() and not stopping.done()   # mid-drain: the request is still computing
            assert not await gw.ready()
            assert await asyncio.wait_for(watch.read(), 30) is grpc.aio.EOF   # the watch ends: it cannot hold
            assert await watch.code() == grpc.StatusCode.OK                  # the drain open for the grace
            backend.release()
            assert top1(await asyncio.wait_for(in_flight, 30)) == [1]
            await asyncio.wait_for(stopping, 30)    # done once the request is: not after the 3600 s grace
    assert backend.closed


async def test_grace_running_out_fails_in_flight_requests_clearly_and_stops() -> None:
    """A backend that never answers: after the grace period the in-flight requests get UNAVAILABLE
    (gRPC) / Unavailable (SDK over HTTP), the stop completes and the backend is closed."""
    from clients.sdk import AsyncImageClient, Unavailable

    backend = ScriptedBackend()
    backend.hold()                                  # never released while the gateway runs
    async with running_gateway(backend, shutdown_grace_s=0.5) as gw:
        via_grpc = asyncio.create_task(classify(grpc_target(gw), [1]))
        # One request in the held backend call first: sent together, both could join that call's batch
        # (an idle backend dispatches at once) and none would be left queued.
        await until(lambda: len(backend.calls) == 1)

        async def via_sdk_http() -> object:
            async with AsyncImageClient(http_url(gw)) as client:
                return await client.classify(grey_png(2), "tiny")

        via_http = asyncio.create_task(via_sdk_http())
        await until(lambda: gw.metrics.sample("imgserve_queue_depth", {"model": "tiny"}) == 1)
        assert len(backend.calls) == 1
        await asyncio.wait_for(gw.stop(), 60)       # returns although the backend never answers
        assert backend.closed
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await via_grpc
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(Unavailable):
            await via_http


async def test_second_signal_abandons_the_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve() under real SIGTERMs: the first starts a drain that a stuck request would keep going for the
    whole (hour-long) grace period; the second abandons it: the in-flight request fails UNAVAILABLE,
    the backend is still closed, and serve() ends (cancelled) instead of waiting."""
    backend = ScriptedBackend()
    backend.hold()
    monkeypatch.setattr(app, "create_backend", lambda settings: backend)
    started: asyncio.Future[Gateway] = asyncio.get_running_loop().create_future()

    async def on_started(gateway: Gateway) -> None:
        started.set_result(gateway)

    serving = asyncio.create_task(app.serve(gateway_settings(shutdown_grace_s=3600.0), on_started=on_started))
    try:
        gw = await asyncio.wait_for(asyncio.shield(started), 60)
        in_flight = asyncio.create_task(classify(grpc_target(gw), [1]))
        await asyncio.wait_for(backend.entered.wait(), 30)
        os.kill(os.getpid(), signal.SIGTERM)                 # serve() installed handlers for these
        await until(lambda: gw.draining)
        assert not in_flight.done()                          # the drain waits for it
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(serving, 60)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(in_flight, 30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert backend.closed and gw.grpc_server is None and gw.http_runner is None
    finally:
        backend.release()
        if not serving.done():
            serving.cancel()


async def test_drain_sends_queued_requests_without_waiting_for_the_batching_delay() -> None:
    """A ten-minute batching window and an hour of grace: requests queued behind a busy call are
    answered by the drain as soon as that call returns (one backend call for both)."""
    backend = ScriptedBackend()
    backend.hold()
    async with running_gateway(backend, max_queue_delay_ms=600_000.0, shutdown_grace_s=3600.0) as gw:
        busy = asyncio.create_task(classify(grpc_target(gw), [0]))
        await asyncio.wait_for(backend.entered.wait(), 30)
        requests = [asyncio.create_task(classify(grpc_target(gw), [v])) for v in (1, 2)]
        await until(lambda: gw.metrics.sample("imgserve_queue_depth", {"model": "tiny"}) == 2)
        assert len(backend.calls) == 1
        stopping = asyncio.create_task(gw.stop())
        await asyncio.sleep(0.05)
        backend.release()
        await asyncio.wait_for(stopping, 60)
        answers = await asyncio.wait_for(asyncio.gather(busy, *requests), 30)
    assert [top1(a) for a in answers] == [[0], [1], [2]]
    assert [batch.shape[0] for _, batch in backend.calls] == [1, 2]
    assert backend.closed


async def test_overload_is_429_with_retry_after() -> None:
    """Requests that do not fit the model's queue: RESOURCE_EXHAUSTED / 429 + Retry-After, nothing breaks.

    The backend is held with one call in flight, so queued items wait (the batcher sends at once only
    while a slot is free): a 4-image request fills 4 of the 5 places, further 4-image requests are
    refused over gRPC and HTTP, and after the release both accepted requests are answered.
    """
    backend = ScriptedBackend()
    backend.hold()
    async with running_gateway(backend, max_queue_size=5) as gw:
        async with grpc.aio.insecure_channel(grpc_target(gw)) as channel:
            stub = pb_grpc.ImageServiceStub(channel)
            first = asyncio.ensure_future(stub.Classify(pb.ClassifyRequest(model="tiny", images=[grey_png(1)]),
                                                        timeout=60))
            await until(lambda: len(backend.calls) == 1)
            waiting = asyncio.ensure_future(stub.Classify(
                pb.ClassifyRequest(model="tiny", images=[grey_png(2)] * 4), timeout=60))
            await until(lambda: gw.metrics.sample("imgserve_queue_depth", {"model": "tiny"}) == 4)
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Classify(pb.ClassifyRequest(model="tiny", images=[grey_png(3)] * 4), timeout=60)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "queue is full" in info.value.details()
                retry_after = int(dict(info.value.trailing_metadata())["retry-after"])
                assert retry_after >= 1 and info.value.details().endswith(f"retry after {retry_after} s")
            body = {"model": "tiny", "images": [base64.b64encode(grey_png(3)).decode()] * 4}
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{http_url(gw)}/v1/classify", json=body) as response:
                    assert response.status == 429
                    assert int(response.headers["Retry-After"]) >= 1
                    assert (await response.json())["error"]["code"] == "RESOURCE_EXHAUSTED"
            assert not waiting.done()
            backend.release()
            assert len((await first).results) == 1 and len((await waiting).results) == 4
