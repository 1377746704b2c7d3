"""An in-process stand-in for Triton's gRPC API (inference.GRPCInferenceService), for TritonBackend tests.

Why: a real tritonserver (tests/test_triton_backend.py) cannot be told to publish
a new model version while serving or to fail a call with a chosen gRPC status.
This server speaks the real protocol through tritonclient's own generated
servicer, so the backend's client code, tritonclient's error wrapping and
serving.backends.triton.map_error all run for real. It binds port 0.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncio

import grpc
import grpc.aio
import numpy as np
from tritonclient.grpc import service_pb2 as sv
from tritonclient.grpc import service_pb2_grpc as sv_grpc

from serving.repository import ModelSpec, to_model_config


class FakeTriton(sv_grpc.GRPCInferenceServiceServicer):
    """Serves ``specs`` (name -> spec); ``fail_infer`` makes ModelInfer abort with (code, message)."""

    def __init__(self, *specs: ModelSpec) -> None:
        self.specs: dict[str, ModelSpec] = {s.name: s for s in specs}
        self.fail_infer: tuple[grpc.StatusCode, str] | None = None
        self.infer_calls: list[tuple[str, tuple[int, ...]]] = []
        self.config_requests = 0
        self.reloading: set[str] = set()      # listed as LOADING, and unknown to ModelInfer (a reload)
        self._unhung: asyncio.Event | None = None

    def hang(self) -> None:
        """Every call from now on waits without answering (what SIGSTOP does to Triton)."""
        self._unhung = asyncio.Event()

    def resume(self) -> None:
        """Answer again, calls that were hanging included (SIGCONT)."""
        if self._unhung is not None:
            self._unhung.set()
            self._unhung = None

    async def _maybe_hang(self) -> None:
        if self._unhung is not None:
            await self._unhung.wait()

    def publish(self, spec: ModelSpec) -> None:
        """A new version (or model) becomes READY, as after Triton loaded it."""
        self.specs = {**self.specs, spec.name: spec}

    async def ServerReady(self, request: sv.ServerReadyRequest, context: grpc.aio.ServicerContext
                          ) -> sv.ServerReadyResponse:
        await self._maybe_hang()
        return sv.ServerReadyResponse(ready=True)

    async def RepositoryIndex(self, request: sv.RepositoryIndexRequest, context: grpc.aio.ServicerContext
                              ) -> sv.RepositoryIndexResponse:
        await self._maybe_hang()
        return sv.RepositoryIndexResponse(models=[
            sv.RepositoryIndexResponse.ModelIndex(name=s.name, version=str(s.version),
                                                  state="LOADING" if s.name in self.reloading else "READY")
            for s in self.specs.values()])

    def _spec(self, name: str) -> ModelSpec | None:
        return self.specs.get(name)

    async def ModelMetadata(self, request: sv.ModelMetadataRequest, context: grpc.aio.ServicerContext
                            ) -> sv.ModelMetadataResponse:
        spec = self._spec(request.name)
        if spec is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{request.name}'")
        tensor = sv.ModelMetadataResponse.TensorMetadata
        return sv.ModelMetadataResponse(
            name=spec.name, versions=[str(spec.version)], platform="onnxruntime_onnx",
            inputs=[tensor(name=spec.input_name, datatype="UINT8", shape=[-1, *spec.input_shape])],
            outputs=[tensor(name=spec.output_name, datatype="FP32", shape=[-1, spec.num_classes])])

    async def ModelConfig(self, request: sv.ModelConfigRequest, context: grpc.aio.ServicerContext
                          ) -> sv.ModelConfigResponse:
        spec = self._spec(request.name)
        if spec is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{request.name}'")
        self.config_requests += 1
        return sv.ModelConfigResponse(config=to_model_config(spec))

    async def ModelInfer(self, request: sv.ModelInferRequest, context: grpc.aio.ServicerContext
                         ) -> sv.ModelInferResponse:
        spec = self._spec(request.model_name)
        shape = tuple(request.inputs[0].shape)
        self.infer_calls.append((request.model_name, shape))
        await self._maybe_hang()
        if request.model_name in self.reloading:
            spec = None
        if self.fail_infer is not None:
            await context.abort(*self.fail_infer)
        if spec is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{request.model_name}'")
        batch = np.frombuffer(request.raw_input_contents[0], np.uint8).reshape(shape)
        probs = np.zeros((shape[0], spec.num_classes), np.float32)
        probs[np.arange(shape[0]), batch.reshape(shape[0], -1)[:, 0] % spec.num_classes] = 1.0
        out = sv.ModelInferResponse.InferOutputTensor(name=spec.output_name, datatype="FP32",
                                                      shape=list(probs.shape))
        return sv.ModelInferResponse(model_name=spec.name, model_version=str(spec.version), outputs=[out],
                                     raw_output_contents=[probs.tobytes()])


@asynccontextmanager
async def serving_fake_triton(fake: FakeTriton) -> AsyncIterator[str]:
    """Run ``fake`` on a loopback port the OS picks; yields its "127.0.0.1:PORT"."""
    server = grpc.aio.server()
    sv_grpc.add_GRPCInferenceServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)
