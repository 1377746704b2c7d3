"""imgserve.v1.ImageService over gRPC, and the wire <-> data-plane conversions the HTTP mirror reuses."""
from __future__ import annotations

import grpc

from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from clients.proto.imgserve.v1 import imgserve_pb2_grpc as pb_grpc
from serving.dataplane import ClassifyResult, DataPlane, ModelStatus
from serving.metrics import Metrics
from serving.transports.grpc_util import call_deadline, guarded
from serving.transports.observe import UNKNOWN_MODEL

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ImageService"].full_name


def classify_options(request: pb.ClassifyRequest) -> tuple[int | None, bool | None]:
    """(top_k, ten_crop) with proto3 presence: unset -> None (the data plane's defaults apply)."""
    top_k = request.top_k if request.HasField("top_k") else None
    ten_crop = request.ten_crop if request.HasField("ten_crop") else None
    return top_k, ten_crop


def classify_response(result: ClassifyResult) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(
        model=result.model,
        model_version=str(result.version),
        ten_crop=result.ten_crop,
        results=[pb.Classification(classes=[pb.ClassScore(index=c.index, label=c.label, score=c.score)
                                            for c in row])
                 for row in result.results],
    )


def model_info(status: ModelStatus) -> pb.ModelInfo:
    spec = status.spec
    pre = spec.preprocess
    return pb.ModelInfo(
        name=spec.name, version=str(spec.version), task=spec.task, num_classes=spec.num_classes,
        resize=pre.resize, crop=pre.crop, channels=pre.channels, ten_crop_default=pre.ten_crop_default,
        max_batch_size=spec.max_batch_size, ready=status.ready, description=spec.description,
    )


def list_models_response(statuses: list[ModelStatus]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(models=[model_info(s) for s in sorted(statuses, key=lambda s: s.spec.name)])


class ImageService(pb_grpc.ImageServiceServicer):
    """Maps ClassifyRequest/ListModelsRequest onto the DataPlane; errors become gRPC statuses."""

    def __init__(self, dataplane: DataPlane, metrics: Metrics) -> None:
        self._dataplane = dataplane
        self._metrics = metrics

    async def Classify(self, request: pb.ClassifyRequest,
                       context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        with self._metrics.request("grpc.Classify", request.model or UNKNOWN_MODEL) as record:
            top_k, ten_crop = classify_options(request)
            result = await guarded(context, record, self._dataplane.classify(
                request.model, list(request.images), top_k=top_k, ten_crop=ten_crop,
                deadline=call_deadline(context)))
            return classify_response(result)

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        with self._metrics.request("grpc.ListModels", "") as record:
            statuses = await guarded(context, record, self._dataplane.list_models())
            return list_models_response(statuses)


def add_to_server(service: ImageService, server: grpc.aio.Server) -> None:
    pb_grpc.add_ImageServiceServicer_to_server(service, server)
