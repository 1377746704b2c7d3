"""Open Inference Protocol (KServe v2) over gRPC: ``inference.GRPCInferenceService``.

The protocol messages and service come from the stubs tritonclient ships, so an
unmodified ``tritonclient.grpc`` client works against the gateway. Models look
like this to v2 clients (see serving/transports/oip.py): BYTES ``image`` [N] of
encoded images in, FP32 ``probabilities`` [N, K] (or classification strings) out.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as v2
from tritonclient.grpc import service_pb2_grpc as v2_grpc

from serving.dataplane import DataPlane, ModelStatus
from serving.errors import InvalidInput, ModelNotFound
from serving.metrics import Metrics
from serving.settings import Settings
from serving.transports import oip
from serving.transports.grpc_util import call_deadline, guarded

SERVICE_NAME = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


def parameter_value(param: v2.InferParameter) -> object:
    """The Python value of an InferParameter's oneof (None when unset)."""
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None


def decode_parameters(params: "dict[str, v2.InferParameter]") -> dict[str, object]:
    return {key: parameter_value(value) for key, value in params.items()}


def request_images(request: v2.ModelInferRequest) -> list[bytes]:
    """The encoded images of a ModelInferRequest, from raw_input_contents or contents.bytes_contents."""
    if len(request.inputs) != 1:
        raise InvalidInput(f"expected exactly one input ({oip.INPUT_NAME!r}), got {len(request.inputs)}")
    tensor = request.inputs[0]
    count = oip.check_image_input(tensor.name, tensor.datatype, tensor.shape)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidInput(f"raw_input_contents has {len(request.raw_input_contents)} entries for 1 input")
        if len(tensor.contents.bytes_contents):
            raise InvalidInput("input data given both in raw_input_contents and contents")
        images = oip.deserialize_bytes(request.raw_input_contents[0])
    else:
        images = list(tensor.contents.bytes_contents)
    if len(images) != count:
        raise InvalidInput(f"input {oip.INPUT_NAME!r} has shape {list(tensor.shape)} but carries {len(images)} elements")
    return images


def requested_outputs(request: v2.ModelInferRequest) -> list[oip.RequestedOutput]:
    outs: list[oip.RequestedOutput] = []
    for out in request.outputs:
        count = 0
        if "classification" in out.parameters:
            value = parameter_value(out.parameters["classification"])
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidInput("output parameter 'classification' must be a positive integer")
            count = value
        outs.append(oip.RequestedOutput(out.name, count))
    return outs


def tensor_metadata(entries: Sequence[Mapping[str, Any]]) -> list[v2.ModelMetadataResponse.TensorMetadata]:
    return [v2.ModelMetadataResponse.TensorMetadata(name=e["name"], datatype=e["datatype"], shape=e["shape"])
            for e in entries]


class InferenceService(v2_grpc.GRPCInferenceServiceServicer):
    """The v2 inference service on top of the DataPlane."""

    def __init__(self, dataplane: DataPlane, metrics: Metrics, settings: Settings,
                 readiness: Callable[[], Awaitable[bool]] | None = None) -> None:
        self._dataplane = dataplane
        self._metrics = metrics
        self._settings = settings
        self._readiness = readiness or dataplane.ready

    async def ServerLive(self, request: v2.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: v2.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=await self._readiness())

    async def ModelReady(self, request: v2.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> v2.ModelReadyResponse:
        # like Triton: an unknown model or version is simply "not ready"
        try:
            status = await self._dataplane.get_model(request.name)
            oip.check_version(status, request.version)
        except ModelNotFound:
            return v2.ModelReadyResponse(ready=False)
        return v2.ModelReadyResponse(ready=status.ready)

    async def ServerMetadata(self, request: v2.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> v2.ServerMetadataResponse:
        meta = oip.server_metadata()
        return v2.ServerMetadataResponse(name=meta["name"], version=meta["version"],
                                         extensions=meta["extensions"])

    async def ModelMetadata(self, request: v2.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> v2.ModelMetadataResponse:
        with self._metrics.request("grpc.v2.ModelMetadata", request.name) as record:
            status = await guarded(context, record, self._model(request.name, request.version))
            meta = oip.model_metadata(status.spec)
            return v2.ModelMetadataResponse(
                name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                inputs=tensor_metadata(meta["inputs"]), outputs=tensor_metadata(meta["outputs"]))

    async def ModelConfig(self, request: v2.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> v2.ModelConfigResponse:
        with self._metrics.request("grpc.v2.ModelConfig", request.name) as record:
            status = await guarded(context, record, self._model(request.name, request.version))
            cfg = oip.gateway_model_config(status.spec, self._settings.max_images_per_request)
            return v2.ModelConfigResponse(config=cfg)

    async def RepositoryIndex(self, request: v2.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> v2.RepositoryIndexResponse:
        with self._metrics.request("grpc.v2.RepositoryIndex", "") as record:
            control = self._dataplane.model_control
            if control is not None:   # the embedded backend: unloaded repository models are listed too
                entries = await guarded(context, record, control.index())
                return v2.RepositoryIndexResponse(models=[
                    v2.RepositoryIndexResponse.ModelIndex(name=e.name, version=e.version, state=e.state,
                                                          reason=e.reason)
                    for e in entries if not request.ready or e.state == "READY"])
            statuses = await guarded(context, record, self._dataplane.list_models())
            models = [v2.RepositoryIndexResponse.ModelIndex(
                name=s.spec.name, version=str(s.spec.version), state="READY" if s.ready else "UNAVAILABLE")
                for s in sorted(statuses, key=lambda s: s.spec.name)
                if not request.ready or s.ready]
            return v2.RepositoryIndexResponse(models=models)

    async def RepositoryModelLoad(self, request: v2.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext) -> v2.RepositoryModelLoadResponse:
        """Load or reload a model (--model-control-mode explicit; serving/reload.py)."""
        with self._metrics.request("grpc.v2.RepositoryModelLoad", request.model_name) as record:
            await guarded(context, record, repository_call(self._dataplane, "load", request.model_name))
            return v2.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: v2.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext) -> v2.RepositoryModelUnloadResponse:
        with self._metrics.request("grpc.v2.RepositoryModelUnload", request.model_name) as record:
            await guarded(context, record, repository_call(self._dataplane, "unload", request.model_name))
            return v2.RepositoryModelUnloadResponse()

    async def ModelInfer(self, request: v2.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> v2.ModelInferResponse:
        with self._metrics.request("grpc.v2.ModelInfer", request.model_name) as record:
            outcome = await guarded(context, record, self._infer(request, context))
            response = v2.ModelInferResponse(model_name=outcome.model, model_version=outcome.version,
                                             id=request.id)
            for tensor in outcome.outputs:
                response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
                response.raw_output_contents.append(tensor.raw())
            return response

    async def _model(self, name: str, version: str) -> ModelStatus:
        status = await self._dataplane.get_model(name)
        oip.check_version(status, version)
        return status

    async def _infer(self, request: v2.ModelInferRequest, context: grpc.aio.ServicerContext) -> oip.InferOutcome:
        await self._model(request.model_name, request.model_version)  # unknown model: NOT_FOUND first
        params = decode_parameters(request.parameters)
        timeout_us = oip.request_timeout(params)
        return await oip.infer(
            self._dataplane, request.model_name, request.model_version, request_images(request),
            params=params, outputs=requested_outputs(request),
            deadline=oip.deadline_from(call_deadline(context), timeout_us))


async def repository_call(dataplane: DataPlane, action: str, model: str) -> None:
    """``load`` or ``unload`` through the model control; a clear error where there is none (Triton)."""
    control = dataplane.model_control
    if control is None:
        from serving.reload import NotAllowed
        raise NotAllowed(f"model {action} is not offered with the {dataplane.backend.name} backend; "
                         f"use the backend's own repository API")
    if not model:
        raise InvalidInput("the request names no model (field 'model_name')")
    await (control.load(model) if action == "load" else control.unload(model))


def _unimplemented(name: str) -> Callable[..., Awaitable[None]]:
    async def handler(self: InferenceService, request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not offered by the imgserve gateway")

    handler.__name__ = name
    return handler


# Everything else in the protocol (streaming, shared memory, statistics, repository
# load/unload, trace and log settings) answers UNIMPLEMENTED cleanly instead of
# the generated base class's NotImplementedError traceback.
for _method in v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
    if _method.name not in InferenceService.__dict__:
        setattr(InferenceService, _method.name, _unimplemented(_method.name))


def add_to_server(service: InferenceService, server: grpc.aio.Server) -> None:
    v2_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
