"""imgserve Python SDK: classify, detect and segment images through a gateway over gRPC or HTTP/JSON.

    from clients.sdk import ImageClient
    with ImageClient("localhost:8500") as client:
        result = client.classify("digit.png", "lenet5", top_k=3)
        print(result.top1[0].label)

The SDK speaks only the wire protocols (imgserve.v1 over gRPC, its proto3-JSON
mirror over HTTP); it never imports the server or torch. ``AsyncImageClient``
(and with it aiohttp) is imported on first use, so the blocking client and the
CLI start quickly.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clients.sdk.client import ImageClient
from clients.sdk.errors import (DeadlineExceeded, ImgserveError, InternalError, InvalidArgument, NotFound,
                                ResourceExhausted, Unauthenticated, Unavailable)
from clients.sdk.retry import RetryPolicy
from clients.sdk.images import ImageInput
from clients.types import (ClassifyResult, ClassShare, Detection, DetectResult, ImageDetections, ImageSegmentation,
                           ModelInfo, Prediction, SegmentResult)

if TYPE_CHECKING:
    from clients.sdk.aio import AsyncImageClient

__all__ = [
    "AsyncImageClient", "ClassShare", "ClassifyResult", "DeadlineExceeded", "DetectResult", "Detection",
    "ImageClient", "ImageDetections", "ImageInput", "ImageSegmentation", "ImgserveError", "InternalError",
    "InvalidArgument", "ModelInfo", "NotFound", "Prediction", "ResourceExhausted", "RetryPolicy", "SegmentResult",
    "Unauthenticated", "Unavailable",
]


def __getattr__(name: str) -> Any:
    if name == "AsyncImageClient":
        from clients.sdk.aio import AsyncImageClient
        return AsyncImageClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
