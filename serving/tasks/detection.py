"""Detection: letterbox in, boxes out in original-image pixels.

The engine returns TensorRT EfficientNMS-style tensors for the S x S letterboxed input:
``num_detections`` INT32 [N, 1], ``detection_boxes`` FP32 [N, K, 4] (x1, y1, x2, y2),
``detection_scores`` FP32 [N, K] (best first) and ``detection_classes`` INT32 [N, K].
The gateway adds what the engine cannot know: the original image size. Boxes are
mapped back through the letterbox record, so clients never see the model's input size.

Options: ``score_threshold`` in [0, 1] (default: the model's ``imgserve.score_threshold``,
else 0.3), ``max_detections`` in 1..K (default K) and ``tta``: the image and its
horizontal mirror both run, and the two sets of boxes are merged by weighted box
fusion (boxes of one class overlapping by IoU > 0.55 become their score-weighted
mean; a box seen in only one view keeps half its score).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from serving.errors import InvalidInput
from serving.preprocess import DecodeOptions, Letterbox
from serving.repository import ModelSpec, RepositoryError
from serving.tasks.base import (OptionSpec, OutputTensor, Outputs, Prepared, RequestedOutput, TaskDefaults,
                                TaskHandler, TaskResult, label_of, letterbox_views, reject_unknown_outputs,
                                require_outputs)

NUM = "num_detections"
BOXES = "detection_boxes"
SCORES = "detection_scores"
CLASSES = "detection_classes"
OUTPUTS = (NUM, BOXES, SCORES, CLASSES)
DEFAULT_SCORE_THRESHOLD = 0.3
FUSION_IOU = 0.55


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in original-image pixels
    score: float
    index: int
    label: str


@dataclass(frozen=True)
class ImageDetections:
    width: int
    height: int
    detections: list[Detection]


@dataclass(frozen=True)
class DetectOptions:
    score_threshold: float
    max_detections: int
    tta: bool


def max_detections_of(spec: ModelSpec) -> int:
    return int(spec.output(SCORES).dims[0])


def iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one x1,y1,x2,y2 box with each row of ``boxes``."""
    ix1 = np.maximum(box[0], boxes[:, 0])
    iy1 = np.maximum(box[1], boxes[:, 1])
    ix2 = np.minimum(box[2], boxes[:, 2])
    iy2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(ix2 - ix1, 0, None) * np.clip(iy2 - iy1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def fuse_boxes(views: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
               iou_threshold: float = FUSION_IOU) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted box fusion of the (boxes, scores, classes) found in several views of one image.

    Boxes are taken best score first; each joins the cluster of its class whose fused box
    overlaps it most (IoU > threshold), or starts a new one. A cluster's box is the
    score-weighted mean of its members; its score is their mean score times
    min(members, views) / views, so agreement between views counts and a lone box is halved.
    """
    n_views = len(views)
    boxes = np.concatenate([v[0] for v in views]).astype(np.float32).reshape(-1, 4)
    scores = np.concatenate([v[1] for v in views]).astype(np.float32).reshape(-1)
    classes = np.concatenate([v[2] for v in views]).astype(np.int32).reshape(-1)
    order = np.argsort(-scores, kind="stable")
    members: list[list[int]] = []
    fused: list[np.ndarray] = []
    fused_class: list[int] = []
    for i in order:
        best, best_iou = -1, iou_threshold
        candidates = [c for c in range(len(fused)) if fused_class[c] == classes[i]]
        if candidates:
            ious = iou_one_to_many(boxes[i], np.stack([fused[c] for c in candidates]))
            j = int(np.argmax(ious))
            if ious[j] > best_iou:
                best = candidates[j]
        if best < 0:
            members.append([int(i)])
            fused.append(boxes[i].copy())
            fused_class.append(int(classes[i]))
            continue
        members[best].append(int(i))
        weights = scores[members[best]]
        fused[best] = (boxes[members[best]] * weights[:, None]).sum(axis=0) / max(float(weights.sum()), 1e-12)
    if not fused:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int32)
    out_scores = np.array([scores[m].mean() * min(len(m), n_views) / n_views for m in members], np.float32)
    return np.stack(fused).astype(np.float32), out_scores, np.array(fused_class, np.int32)


class DetectionHandler(TaskHandler):
    task = "detection"
    v1_method = "Detect"
    v1_request = pb.DetectRequest
    options = (
        OptionSpec("score_threshold", float, "drop detections scoring below this, in [0, 1]"),
        OptionSpec("max_detections", int, "at most this many detections per image, 1..K"),
        OptionSpec("tta", bool, "horizontal-flip test-time augmentation merged by weighted box fusion"),
    )
    postprocess_in_pool = False  # a few hundred boxes per image: cheaper than a thread hop

    def check_spec(self, spec: ModelSpec) -> None:
        if spec.preprocess.geometry != "letterbox":
            raise RepositoryError(f"model {spec.name!r}: a detector uses the letterbox geometry "
                                  f"(imgserve.geometry: letterbox)")
        require_outputs(spec, self.task, {NUM: ("INT32", 1), BOXES: ("FP32", 2), SCORES: ("FP32", 1),
                                          CLASSES: ("INT32", 1)})
        k = max_detections_of(spec)
        if k <= 0 or spec.output(BOXES).dims != (k, 4) or spec.output(CLASSES).dims != (k,):
            raise RepositoryError(f"model {spec.name!r}: detection outputs need one fixed K: boxes [K, 4], "
                                  f"scores [K], classes [K]")
        threshold = spec.extra.get("score_threshold")
        if threshold is not None:
            try:
                value = float(threshold)
            except ValueError:
                value = -1.0
            if not 0.0 <= value <= 1.0:
                raise RepositoryError(f"model {spec.name!r}: imgserve.score_threshold={threshold!r} is not in [0, 1]")

    def parse_options(self, spec: ModelSpec, raw: Mapping[str, object], defaults: TaskDefaults) -> DetectOptions:
        k = max_detections_of(spec)
        threshold = float(raw.get("score_threshold", spec.extra.get("score_threshold", DEFAULT_SCORE_THRESHOLD)))
        if not 0.0 <= threshold <= 1.0:
            raise InvalidInput(f"score_threshold must be in [0, 1], got {threshold!r}")
        limit = raw.get("max_detections", k)
        if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or not 1 <= limit <= k:
            raise InvalidInput(f"max_detections must be an integer from 1 to {k} (model {spec.name!r} "
                               f"returns at most {k}), got {limit!r}")
        tta = raw.get("tta")
        return DetectOptions(score_threshold=threshold, max_detections=int(limit),
                             tta=spec.preprocess.ten_crop_default if tta is None else bool(tta))

    def tta(self, options: DetectOptions) -> bool:
        return options.tta

    def prepare(self, data: bytes, spec: ModelSpec, options: DetectOptions, *, index: int,
                decode: DecodeOptions) -> Prepared:
        return letterbox_views(data, spec, options.tta, index=index, decode_options=decode)

    def postprocess(self, spec: ModelSpec, options: DetectOptions, prepared: Sequence[Prepared],
                    outputs: Outputs) -> list[ImageDetections]:
        views = 2 if options.tta else 1
        size = spec.preprocess.crop
        results: list[ImageDetections] = []
        for i, item in enumerate(prepared):
            found = []
            for v in range(views):
                row = i * views + v
                n = int(outputs[NUM][row, 0])
                boxes = outputs[BOXES][row, :n].astype(np.float32)
                if v == 1:  # the mirrored view: x -> S - x, and x1/x2 swap
                    boxes = np.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], axis=1)
                found.append((boxes, outputs[SCORES][row, :n], outputs[CLASSES][row, :n]))
            boxes, scores, classes = fuse_boxes(found) if views > 1 else found[0]
            keep = np.flatnonzero(scores >= options.score_threshold)
            keep = keep[np.argsort(-scores[keep], kind="stable")][:options.max_detections]
            geometry: Letterbox = item.geometry
            original = geometry.boxes_to_original(boxes[keep])
            results.append(ImageDetections(
                width=geometry.width, height=geometry.height,
                detections=[Detection(box=tuple(float(c) for c in original[j]), score=float(scores[k]),
                                      index=int(classes[k]), label=label_of(spec, int(classes[k])))
                            for j, k in enumerate(keep)]))
        return results

    def v1_response(self, result: TaskResult, spec: ModelSpec) -> pb.DetectResponse:
        return pb.DetectResponse(
            model=result.model, model_version=result.version, tta=result.tta,
            results=[pb.ImageDetections(
                width=image.width, height=image.height,
                detections=[pb.Detection(box=pb.Box(x1=d.box[0], y1=d.box[1], x2=d.box[2], y2=d.box[3]),
                                         score=d.score, index=d.index, label=d.label)
                            for d in image.detections])
                for image in result.images])

    def v2_outputs(self, result: TaskResult, spec: ModelSpec,
                   requested: Sequence[RequestedOutput]) -> list[OutputTensor]:
        requested = list(requested) or [RequestedOutput(name) for name in OUTPUTS]
        reject_unknown_outputs(requested, OUTPUTS, spec.name)
        n = len(result.images)
        k = max((len(image.detections) for image in result.images), default=0)
        arrays: dict[str, np.ndarray] = {
            NUM: np.array([[len(image.detections)] for image in result.images], np.int32).reshape(n, 1),
            BOXES: np.zeros((n, k, 4), np.float32),
            SCORES: np.zeros((n, k), np.float32),
            CLASSES: np.zeros((n, k), np.int32),
        }
        for i, image in enumerate(result.images):
            for j, d in enumerate(image.detections):
                arrays[BOXES][i, j] = d.box
                arrays[SCORES][i, j] = d.score
                arrays[CLASSES][i, j] = d.index
        datatypes = {NUM: "INT32", BOXES: "FP32", SCORES: "FP32", CLASSES: "INT32"}
        for out in requested:
            if out.class_count:
                raise InvalidInput(f"the classification extension does not apply to detector {spec.name!r}")
        return [OutputTensor(out.name, datatypes[out.name], tuple(arrays[out.name].shape), array=arrays[out.name],
                             binary=out.binary) for out in requested]

    def v2_output_metadata(self, spec: ModelSpec) -> list[dict[str, Any]]:
        return [{"name": NUM, "datatype": "INT32", "shape": [-1, 1]},
                {"name": BOXES, "datatype": "FP32", "shape": [-1, -1, 4]},
                {"name": SCORES, "datatype": "FP32", "shape": [-1, -1]},
                {"name": CLASSES, "datatype": "INT32", "shape": [-1, -1]}]
