"""imgserve Python SDK: classify images through a gateway over gRPC or HTTP/JSON.

    from clients.sdk import ImageClient
    with ImageClient("localhost:8500") as client:
        result = client.classify("digit.png", "lenet5", top_k=3)
        print(result.top1[0].label)

The SDK speaks only the wire protocols (imgserve.v1 over gRPC, its proto3-JSON
mirror over HTTP); it never imports the server or torch.
"""
from __future__ import annotations

from clients.sdk.aio import AsyncImageClient
from clients.sdk.client import ImageClient
from clients.sdk.errors import (DeadlineExceeded, ImgserveError, InternalError, InvalidArgument, NotFound,
                                ResourceExhausted, Unavailable)
from clients.sdk.images import ImageInput
from clients.types import ClassifyResult, ModelInfo, Prediction

__all__ = [
    "AsyncImageClient", "ClassifyResult", "DeadlineExceeded", "ImageClient", "ImageInput", "ImgserveError",
    "InternalError", "InvalidArgument", "ModelInfo", "NotFound", "Prediction", "ResourceExhausted", "Unavailable",
]
