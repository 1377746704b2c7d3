"""Model updates without downtime on the embedded backend (serving/reload.py, serving/backends/onnxruntime.py).

Tiny real ONNX models (benchmarks/reliability/tinymodel.py) answer class ``version % 3``, so every
answer says which version computed it.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp
import grpc
import grpc.aio
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as v2
from tritonclient.grpc import service_pb2_grpc as v2_grpc

from benchmarks.reliability.tinymodel import add_version
from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from clients.proto.imgserve.v1 import imgserve_pb2_grpc as pb_grpc
from serving.backends.onnxruntime import OnnxRuntimeBackend
from serving.repository import Preprocess
from serving.settings import Settings
from tests.fakes import grey_png, grpc_target, http_url, running_gateway, tiny_spec, until

pytestmark = pytest.mark.timeout(120)


def backend_for(repo: Path, **overrides: object) -> OnnxRuntimeBackend:
    settings = Settings(model_repository=repo, backend_threads=1)
    for key, value in overrides.items():
        setattr(settings, key, value)
    return OnnxRuntimeBackend(settings)


async def answers_under_load(stub: pb_grpc.ImageServiceStub, stop: asyncio.Event, seen: list[int],
                             failures: list[BaseException]) -> None:
    request = pb.ClassifyRequest(model="tiny", images=[grey_png(9)], top_k=1)
    while not stop.is_set():
        try:
            seen.append((await stub.Classify(request, timeout=10)).results[0].classes[0].index)
        except grpc.aio.AioRpcError as exc:
            failures.append(exc)


async def test_poll_swaps_versions_under_load_refuses_a_broken_one_and_drops_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    add_version(tmp_path, tiny_spec())                                  # v1 answers 1
    backend = backend_for(tmp_path)
    async with running_gateway(backend, model_control_mode="poll", repository_poll_interval_s=0.1) as gw, \
            grpc.aio.insecure_channel(grpc_target(gw)) as channel:
        stub = pb_grpc.ImageServiceStub(channel)
        stop, seen, failures = asyncio.Event(), [], []
        load = [asyncio.create_task(answers_under_load(stub, stop, seen, failures)) for _ in range(4)]
        await until(lambda: len(seen) > 20)
        add_version(tmp_path, tiny_spec())                              # v2 answers 2, same shape
        await until(lambda: seen[-1] == 2, 20)
        add_version(tmp_path, tiny_spec(preprocess=Preprocess(resize=6, crop=6, channels=1)))   # v3: 0, new shape
        await until(lambda: seen[-1] == 0, 20)
        add_version(tmp_path, tiny_spec(), broken=True)                 # v4: not a model
        await until(lambda: "refusing the new version" in caplog.text, 20)
        count = len(seen)
        await until(lambda: len(seen) > count + 20)
        stop.set()
        await asyncio.gather(*load)
    assert failures == []
    assert seen[-1] == 0                                                # v3 still serves
    assert set(seen) == {1, 2, 0}
    assert "version 3 keeps serving" in caplog.text


async def test_requests_admitted_for_the_old_version_finish_on_it(tmp_path: Path) -> None:
    add_version(tmp_path, tiny_spec())
    backend = backend_for(tmp_path)
    await backend.start()
    try:
        old = (await backend.models())["tiny"]
        add_version(tmp_path, tiny_spec(preprocess=Preprocess(resize=6, crop=6, channels=1)))
        (outcome,) = await backend.poll()
        assert outcome.action == "loaded" and outcome.version == 2
        assert (await backend.models())["tiny"].input_shape == (6, 6, 1)
        out = await backend.infer_spec(old, np.zeros((1, 4, 4, 1), np.uint8))   # old shape, old session
        assert out["probabilities"].argmax(1).tolist() == [1]
        assert [o.action for o in await backend.poll()] == ["unchanged"]
    finally:
        await backend.close()


async def test_explicit_mode_repository_api_over_http_and_grpc(tmp_path: Path) -> None:
    add_version(tmp_path, tiny_spec())
    add_version(tmp_path, tiny_spec("other"))
    backend = backend_for(tmp_path)
    async with running_gateway(backend, model_control_mode="explicit") as gw, aiohttp.ClientSession() as session, \
            grpc.aio.insecure_channel(grpc_target(gw)) as channel:
        base = http_url(gw)
        repo = v2_grpc.GRPCInferenceServiceStub(channel)

        async def index() -> dict[str, str]:
            async with session.post(f"{base}/v2/repository/index") as resp:
                assert resp.status == 200
                return {e["name"]: e["state"] for e in await resp.json()}

        assert await index() == {"other": "READY", "tiny": "READY"}
        async with session.post(f"{base}/v2/repository/models/other/unload") as resp:
            assert resp.status == 200
        assert await index() == {"other": "UNAVAILABLE", "tiny": "READY"}
        grpc_index = await repo.RepositoryIndex(v2.RepositoryIndexRequest(), timeout=10)
        assert {(m.name, m.state, m.reason) for m in grpc_index.models} == {
            ("other", "UNAVAILABLE", "unloaded"), ("tiny", "READY", "")}
        async with session.get(f"{base}/v2/models/other") as resp:
            assert resp.status == 404
        await repo.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="other"), timeout=30)
        assert await index() == {"other": "READY", "tiny": "READY"}
        add_version(tmp_path, tiny_spec())                              # explicit: not picked up by itself
        await asyncio.sleep(0.3)
        assert (await backend.models())["tiny"].version == 1
        async with session.post(f"{base}/v2/repository/models/tiny/load", json={}) as resp:
            assert resp.status == 200
        assert (await backend.models())["tiny"].version == 2
        add_version(tmp_path, tiny_spec(), broken=True)
        async with session.post(f"{base}/v2/repository/models/tiny/load") as resp:
            doc = await resp.json()
            assert resp.status == 500 and "version 2 keeps serving" in doc["error"]
        assert (await backend.models())["tiny"].version == 2
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await repo.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="nope"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_load_and_unload_are_refused_clearly_outside_explicit_mode(tmp_path: Path) -> None:
    add_version(tmp_path, tiny_spec())
    async with running_gateway(backend_for(tmp_path)) as gw, aiohttp.ClientSession() as session, \
            grpc.aio.insecure_channel(grpc_target(gw)) as channel:
        async with session.post(f"{http_url(gw)}/v2/repository/models/tiny/unload") as resp:
            doc = await resp.json()
            assert resp.status == 400 and "--model-control-mode explicit" in doc["error"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await v2_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
                v2.RepositoryModelUnloadRequest(model_name="tiny"), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
