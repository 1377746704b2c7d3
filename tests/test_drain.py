"""Drain without loss (serving/app.py Gateway.stop, serving/drain.py), in process over a ScriptedBackend.

SIGTERM's phases: NOT_SERVING on gRPC health and /readyz at once while requests are still
served for drain_delay_s; then new requests get UNAVAILABLE / 503 + Retry-After +
Connection: close; admitted ones finish; then the servers close.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal

import aiohttp
import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from clients.proto.imgserve.v1 import imgserve_pb2_grpc as pb_grpc
from serving import app
from serving.app import Gateway
from tests.fakes import ScriptedBackend, gateway_settings, grey_png, grpc_target, http_url, running_gateway, until

pytestmark = pytest.mark.timeout(120)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)).status


async def test_drain_phases_not_serving_first_then_clean_refusals_and_every_admitted_request_answered() -> None:
    backend = ScriptedBackend()
    async with running_gateway(backend, drain_delay_s=0.6, shutdown_grace_s=30.0) as gw:
        target, base = grpc_target(gw), http_url(gw)
        async with grpc.aio.insecure_channel(target) as channel, aiohttp.ClientSession() as session:
            stub = pb_grpc.ImageServiceStub(channel)
            request = pb.ClassifyRequest(model="tiny", images=[grey_png(4)], top_k=1)
            body = {"model": "tiny", "images": ["iVBORw0KGgo="]}
            assert (await stub.Classify(request, timeout=10)).results[0].classes[0].index == 1
            backend.hold()
            in_flight = [asyncio.ensure_future(stub.Classify(request, timeout=30)) for _ in range(8)]
            await asyncio.wait_for(backend.entered.wait(), 10)
            stopping = asyncio.create_task(gw.stop())
            await until(lambda: gw.draining)
            # phase 1: NOT_SERVING everywhere, in the same step; still serving
            assert await health(target) == NOT_SERVING
            async with session.get(f"{base}/readyz") as resp:
                assert resp.status == 503
            async with session.get(f"{base}/v1/models") as resp:
                assert resp.status == 200 and resp.headers.get("Connection", "").lower() == "close"
            assert not gw.refusing
            # phase 2: new requests refused cleanly
            await until(lambda: gw.refusing, 10)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Classify(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert dict(info.value.trailing_metadata() or ()).get("retry-after") == "1"
            async with session.post(f"{base}/v1/classify", json=body) as resp:
                doc = await resp.json()
                assert resp.status == 503 and resp.headers["Retry-After"] == "1"
                assert resp.headers.get("Connection", "").lower() == "close"
                assert doc["error"]["code"] == "UNAVAILABLE" and "shutting down" in doc["error"]["message"]
            async with session.get(f"{base}/healthz") as resp:
                assert resp.status == 200                       # probers still get answers
            assert not stopping.done()                          # admitted requests hold the drain open
            backend.release()
            answers = await asyncio.wait_for(asyncio.gather(*in_flight), 30)
            assert all(a.results[0].classes[0].index == 1 for a in answers)
            await asyncio.wait_for(stopping, 30)
    assert backend.closed


async def test_readyz_and_grpc_health_agree_when_the_backend_goes_and_comes_back() -> None:
    backend = ScriptedBackend()
    async with running_gateway(backend) as gw, aiohttp.ClientSession() as session:
        for up in (False, True, False, True):
            backend.closed = not up                             # ScriptedBackend.ready() follows it
            await until(lambda: gw._ready_state == up, 5)       # the monitor looks every 100 ms
            async with session.get(f"{http_url(gw)}/readyz") as resp:
                assert (resp.status == 200) == up
            assert (await health(grpc_target(gw)) == SERVING) == up


async def test_sighup_is_logged_and_ignored_without_model_control(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="imgserve.app")
    backend = ScriptedBackend()
    monkeypatch.setattr(app, "create_backend", lambda settings: backend)
    started: asyncio.Future[Gateway] = asyncio.get_running_loop().create_future()

    async def on_started(gateway: Gateway) -> None:
        started.set_result(gateway)

    serving = asyncio.create_task(app.serve(gateway_settings(), on_started=on_started))
    try:
        gw = await asyncio.wait_for(asyncio.shield(started), 60)
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: "SIGHUP ignored" in caplog.text, 10)
        await asyncio.sleep(0.2)
        assert not gw.draining and not serving.done()
        async with grpc.aio.insecure_channel(grpc_target(gw)) as channel:
            stub = pb_grpc.ImageServiceStub(channel)
            response = await stub.Classify(pb.ClassifyRequest(model="tiny", images=[grey_png(2)]), timeout=10)
            assert response.results[0].classes[0].index == 2
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(serving, 30)
    finally:
        if not serving.done():
            serving.cancel()
