"""Faults the real engines cannot produce on demand, through the real gateway servers in process.

A ScriptedBackend (tests/fakes.py) stands in for ONNX Runtime / Triton: it can hang,
raise something unexpected, or change a model's version while the gateway serves.
"""
from __future__ import annotations

import asyncio
import json

import aiohttp
import grpc
import grpc.aio
import numpy as np
import pytest

from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from clients.proto.imgserve.v1 import imgserve_pb2_grpc as pb_grpc
from serving.errors import BackendError
from serving.transports.grpc_util import INTERNAL_MESSAGE
from tests.fakes import ScriptedBackend, grey_png, grpc_target, http_url, running_gateway, tiny_spec

pytestmark = pytest.mark.timeout(120)

SECRET = "/srv/secret/weights.onnx line 42"   # what an internal exception might say; never for clients


async def classify(target: str, values: list[int], timeout: float = 30.0) -> pb.ClassifyResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ImageServiceStub(channel)
        return await stub.Classify(pb.ClassifyRequest(model="tiny", images=[grey_png(v) for v in values], top_k=1),
                                   timeout=timeout)


async def http_classify(base: str, values: list[int]) -> tuple[int, dict]:
    import base64

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
