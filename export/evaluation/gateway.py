"""Predictors through a running imgserve gateway: the same interface as the repository predictors.

``imgserve eval --url localhost:8500`` scores what users get: images travel as encoded files
through the SDK (gRPC or HTTP), the gateway decodes, letterboxes, batches, runs either backend
and maps boxes and masks back to the original image. Comparing its scores with the repository
predictor's (onnxruntime on the same model.onnx, letterboxed here) checks the serving path end to end.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clients.sdk import ImageClient
from export.evaluation.scoring import Detections


@dataclass
class GatewayDetector:
    """Detect through the gateway; ``score_threshold`` 0 keeps everything the model reports (what mAP wants)."""

    client: ImageClient
    model: str
    score_threshold: float = 0.0
    tta: bool | None = None

    def predict(self, images: list[bytes]) -> list[Detections]:
        result = self.client.detect(images, self.model, score_threshold=self.score_threshold, tta=self.tta)
        found = []
        for image in result:
            if not image.detections:
                found.append(Detections.empty())
                continue
            found.append(Detections(np.array([d.box for d in image.detections], np.float32),
                                    np.array([d.score for d in image.detections], np.float32),
                                    np.array([d.index for d in image.detections], np.int64)))
        return found


@dataclass
class GatewaySegmenter:
    """Segment through the gateway: uint8 [H, W] class masks at each original image's size."""

    client: ImageClient
    model: str
    tta: bool | None = None

    def predict(self, images: list[bytes]) -> list[np.ndarray]:
        return [image.mask for image in self.client.segment(images, self.model, tta=self.tta)]
