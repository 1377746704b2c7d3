"""imgserve.v1.ImageService over gRPC, and the wire <-> data-plane conversions the HTTP mirror reuses.

Every inference RPC (Classify, Detect, Segment) takes the same path: the task handler
registered for the method reads the request's options and builds the response, the
data plane does the rest. A new task's RPC is served by adding its handler; the
method is bound here from serving.tasks.BY_V1_METHOD.
"""
from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import Message

from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from clients.proto.imgserve.v1 import imgserve_pb2_grpc as pb_grpc
from serving.dataplane import DataPlane, ModelStatus
from serving.metrics import Metrics
from serving.tasks import BY_V1_METHOD, TaskHandler
from serving.transports.grpc_util import call_deadline, guarded
from serving.transports.observe import UNKNOWN_MODEL

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ImageService"].full_name


async def run_v1(dataplane: DataPlane, handler: TaskHandler, request: Any, deadline: float | None) -> Message:
    """One imgserve.v1 inference request (any transport) -> its response message."""
    _, spec, result = await dataplane.run(request.model, list(request.images), task=handler.task,
                                          options=handler.raw_options(request), deadline=deadline)
    return handler.v1_response(result, spec)


def model_info(status: ModelStatus) -> pb.ModelInfo:
    spec = status.spec
    pre = spec.preprocess
    return pb.ModelInfo(
        name=spec.name, version=str(spec.version), task=spec.task, num_classes=spec.num_classes,
        resize=pre.resize, crop=pre.crop, channels=pre.channels, ten_crop_default=pre.ten_crop_default,
        max_batch_size=spec.max_batch_size, ready=status.ready, description=spec.description,
        labels=list(spec.labels), geometry=pre.geometry,
    )


def list_models_response(statuses: list[ModelStatus]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(models=[model_info(s) for s in sorted(statuses, key=lambda s: s.spec.name)])


class ImageService(pb_grpc.ImageServiceServicer):
    """Maps imgserve.v1 requests onto the DataPlane; errors become gRPC statuses."""

    def __init__(self, dataplane: DataPlane, metrics: Metrics) -> None:
        self._dataplane = dataplane
        self._metrics = metrics

    async def _infer(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> Message:
        handler = BY_V1_METHOD[method]
        with self._metrics.request(f"grpc.{method}", request.model or UNKNOWN_MODEL) as record:
            return await guarded(context, record, run_v1(self._dataplane, handler, request, call_deadline(context)))

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        return await self._infer("Classify", request, context)

    async def Detect(self, request: pb.DetectRequest, context: grpc.aio.ServicerContext) -> pb.DetectResponse:
        return await self._infer("Detect", request, context)

    async def Segment(self, request: pb.SegmentRequest, context: grpc.aio.ServicerContext) -> pb.SegmentResponse:
        return await self._infer("Segment", request, context)

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        with self._metrics.request("grpc.ListModels", "") as record:
            statuses = await guarded(context, record, self._dataplane.list_models())
            return list_models_response(statuses)


def add_to_server(service: ImageService, server: grpc.aio.Server) -> None:
    pb_grpc.add_ImageServiceServicer_to_server(service, server)
