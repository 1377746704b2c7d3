"""Backend faults with the Triton backend over tests/fake_triton.py: hung and dead servers trip the
circuit breaker (fast UNAVAILABLE, in-flight calls aborted), recovery follows the next probe, a
reloading model is UNAVAILABLE-and-retried (never NOT_FOUND), and the client's deadline reaches Triton."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import pytest
from tritonclient.grpc import service_pb2_grpc as sv_grpc

from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from clients.proto.imgserve.v1 import imgserve_pb2_grpc as pb_grpc
from serving.backends.triton import ModelReloading, TritonBackend
from serving.errors import BackendUnavailable
from tests.fake_triton import FakeTriton
from tests.fakes import grey_png, grpc_target, running_gateway, tiny_spec, until
from tests.procs import triton_settings

pytestmark = pytest.mark.timeout(120)

BATCH = np.full((2, 4, 4, 1), 5, np.uint8)   # answer: class 5 % 3 = 2


class FakeServer:
    """A FakeTriton on a fixed port that can be stopped and started again (a SIGKILL and a restart)."""

    def __init__(self, fake: FakeTriton) -> None:
        self.fake = fake
        self.port = 0
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server()
        sv_grpc.add_GRPCInferenceServiceServicer_to_server(self.fake, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"


@asynccontextmanager
async def fast_backend(fake: FakeTriton, repo: Path) -> AsyncIterator[tuple[TritonBackend, FakeServer]]:
    server = FakeServer(fake)
    await server.start()
    backend = TritonBackend(triton_settings(server.url, repo, triton_health_interval_s=0.1,
                                            triton_probe_timeout_s=0.2))
    await backend.start()
    try:
        yield backend, server
    finally:
        fake.resume()
        await backend.close()
        await server.stop()


async def timed(call) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    try:
        result: object = await call
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        result = exc
    return time.perf_counter() - start, result


async def wait_recovered(backend: TritonBackend, limit_s: float) -> float:
    start = time.perf_counter()
    while True:
        try:
            await backend.infer("tiny", BATCH)
            return time.perf_counter() - start
        except BackendUnavailable:
            assert time.perf_counter() - start < limit_s, "no recovery"
            await asyncio.sleep(0.02)


async def test_hung_triton_aborts_in_flight_calls_fails_fast_and_recovers(tmp_path: Path) -> None:
    fake = FakeTriton(tiny_spec())
    async with fast_backend(fake, tmp_path) as (backend, _):
        assert (await backend.infer("tiny", BATCH))["probabilities"].argmax(1).tolist() == [2, 2]
        fake.hang()                                               # SIGSTOP
        elapsed, result = await timed(backend.infer("tiny", BATCH))
        assert isinstance(result, BackendUnavailable), result     # aborted by the breaker, not the 30 s timeout
        assert elapsed < 2.0
        assert not await backend.ready()
        for _ in range(5):
            elapsed, result = await timed(backend.infer("tiny", BATCH))
            assert isinstance(result, BackendUnavailable) and elapsed < 0.1, (elapsed, result)
        fake.resume()                                             # SIGCONT
        assert await wait_recovered(backend, 2.0) < 2.0


async def test_dead_triton_fails_fast_and_a_restart_is_served_within_two_seconds(tmp_path: Path) -> None:
    fake = FakeTriton(tiny_spec())
    async with fast_backend(fake, tmp_path) as (backend, server):
        await backend.infer("tiny", BATCH)
        await server.stop()                                       # SIGKILL
        await until(lambda: not any(s.healthy for s in backend.servers()), 5)
        elapsed, result = await timed(backend.infer("tiny", BATCH))
        assert isinstance(result, BackendUnavailable) and elapsed < 0.1, (elapsed, result)
        await server.start()                                      # ready again on the same port
        assert await wait_recovered(backend, 2.0) < 2.0


async def test_a_reloading_model_is_unavailable_and_retried_never_not_found_and_others_unaffected(
        tmp_path: Path) -> None:
    fake = FakeTriton(tiny_spec(), tiny_spec("other"))
    async with fast_backend(fake, tmp_path) as (backend, _):
        fake.reloading = {"tiny"}
        await asyncio.sleep(0.3)                                  # probes have seen it LOADING
        assert set(await backend.models()) == {"tiny", "other"}   # still known: no NOT_FOUND
        assert (await backend.infer("other", BATCH))["probabilities"].argmax(1).tolist() == [2, 2]
        retried = asyncio.ensure_future(backend.infer("tiny", BATCH))
        await asyncio.sleep(0.3)
        assert not retried.done()                                 # waiting for the reload
        fake.reloading = set()
        assert (await retried)["probabilities"].argmax(1).tolist() == [2, 2]
        fake.reloading = {"tiny"}                                 # a reload longer than the wait
        elapsed, result = await timed(backend.infer("tiny", BATCH))
        assert isinstance(result, ModelReloading) and result.grpc_code == grpc.StatusCode.UNAVAILABLE
        assert elapsed < 3.0
        assert all(s.healthy for s in backend.servers())          # not the server's fault


async def test_the_client_deadline_reaches_triton_and_a_hung_triton_is_fast_unavailable_through_the_gateway(
        tmp_path: Path) -> None:
    fake = FakeTriton(tiny_spec())
    server = FakeServer(fake)
    await server.start()
    backend = TritonBackend(triton_settings(server.url, tmp_path, triton_health_interval_s=0.1,
                                            triton_probe_timeout_s=0.2))
    try:
        async with running_gateway(backend, request_timeout_s=3600.0) as gw, \
                grpc.aio.insecure_channel(grpc_target(gw)) as channel:
            timeouts: list[float] = []
            for triton in backend._servers:
                infer = triton.client.infer

                async def spy(*args, _infer=infer, **kwargs):  # type: ignore[no-untyped-def]
                    timeouts.append(kwargs["client_timeout"])
                    return await _infer(*args, **kwargs)

                triton.client.infer = spy  # type: ignore[method-assign]
            stub = pb_grpc.ImageServiceStub(channel)
            request = pb.ClassifyRequest(model="tiny", images=[grey_png(5)], top_k=1)
            assert (await stub.Classify(request, timeout=1.5)).results[0].classes[0].index == 2
            # the client's 1.5 s (plus gRPC's rounding of the deadline header), not the 30 s default
            assert timeouts and 0 < timeouts[-1] <= 1.6
            fake.hang()
            await until(lambda: not any(s.healthy for s in backend.servers()), 5)
            for _ in range(5):
                start = time.perf_counter()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Classify(request, timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert time.perf_counter() - start < 0.1
    finally:
        fake.resume()
        await server.stop()
