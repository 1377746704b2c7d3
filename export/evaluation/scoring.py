"""Scores for detection (COCO mAP through pycocotools) and segmentation (per-class IoU, mIoU).

Only numpy and pycocotools: this runs wherever predictions come from (an exported ONNX file, a
running gateway, a training loop) and never imports torch. AP is pycocotools' own computation,
never re-implemented here; this module only converts to and from its formats.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

VOID = 255


@dataclass(frozen=True)
class Detections:
    """One image's detections in ORIGINAL image pixels: boxes float32 [n, 4] x1 y1 x2 y2, scores [n], 0-based labels [n]."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.scores)
        if np.shape(self.boxes) != (n, 4) or len(self.labels) != n:
            raise ValueError(f"detections need boxes [n, 4], scores [n], labels [n]; got {np.shape(self.boxes)}, "
                             f"{np.shape(self.scores)}, {np.shape(self.labels)}")

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


@dataclass(frozen=True)
class DetectionScores:
    """COCO bbox metrics: map = mAP@[.5:.95], map50, map75 and AP@[.5:.95] per class name (all areas, 100 dets)."""

    map: float
    map50: float
    map75: float
    per_class: dict[str, float]
    images: int
    detections: int

    def to_dict(self) -> dict[str, Any]:
        return {"map": self.map, "map50": self.map50, "map75": self.map75, "per_class_ap": self.per_class,
                "images": self.images, "detections": self.detections}


def load_coco(source: Path | dict) -> dict:
    """A COCO instances dataset as a dict (from a file or a dict, which is deep-copied: pycocotools mutates it)."""
    return json.loads(Path(source).read_text()) if not isinstance(source, dict) else copy.deepcopy(source)


def coco_results(image_ids: Sequence[int], detections: Sequence[Detections], category_ids: Sequence[int]
                 ) -> list[dict[str, Any]]:
    """Detections -> COCO's result format (bbox as x, y, w, h; category ids from 0-based labels)."""
    if len(image_ids) != len(detections):
        raise ValueError(f"{len(image_ids)} image ids for {len(detections)} detection lists")
    out = []
    for image_id, det in zip(image_ids, detections):
        for (x1, y1, x2, y2), score, label in zip(np.asarray(det.boxes, np.float64), det.scores, det.labels):
            out.append({"image_id": int(image_id), "category_id": int(category_ids[int(label)]),
                        "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(score)})
    return out


def score_detections(ground_truth: Path | dict, image_ids: Sequence[int], detections: Sequence[Detections]
                     ) -> DetectionScores:
    """COCO mAP of ``detections`` (one per image id, original pixels) against a COCO instances file, by pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_data = load_coco(ground_truth)
    categories = sorted(gt_data["categories"], key=lambda c: c["id"])
    category_ids = [int(c["id"]) for c in categories]
    results = coco_results(image_ids, detections, category_ids)
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet):
        gt = COCO()
        gt.dataset = gt_data
        gt.createIndex()
        if not results:
            return DetectionScores(0.0, 0.0, 0.0, {c["name"]: 0.0 for c in categories}, len(image_ids), 0)
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.params.imgIds = [int(i) for i in image_ids]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = evaluator.stats
    precision = evaluator.eval["precision"]  # [iou thresholds, recall points, classes, areas, max dets]
    per_class = {}
    for k, cat in enumerate(categories):
        p = precision[:, :, k, 0, -1]
        valid = p[p > -1]
        per_class[str(cat["name"])] = float(valid.mean()) if valid.size else float("nan")
    return DetectionScores(float(stats[0]), float(stats[1]), float(stats[2]), per_class, len(image_ids), len(results))


@dataclass
class ConfusionMatrix:
    """Pixel counts [true class, predicted class]; VOID (255) ground-truth pixels are ignored."""

    num_classes: int
    counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.counts = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, predicted: np.ndarray, truth: np.ndarray) -> None:
        if predicted.shape != truth.shape:
            raise ValueError(f"predicted mask {predicted.shape} and ground truth {truth.shape} differ in size")
        t = truth.reshape(-1).astype(np.int64)
        p = predicted.reshape(-1).astype(np.int64)
        keep = t != VOID
        t, p = t[keep], p[keep]
        if t.size and (t.max() >= self.num_classes or p.max() >= self.num_classes):
            raise ValueError(f"class index out of range for {self.num_classes} classes")
        self.counts += np.bincount(t * self.num_classes + p, minlength=self.num_classes ** 2).reshape(
            self.num_classes, self.num_classes)

    def iou(self) -> np.ndarray:
        """IoU per class: TP / (TP + FP + FN); NaN for a class absent from both truth and prediction."""
        tp = np.diag(self.counts).astype(np.float64)
        union = self.counts.sum(0) + self.counts.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


@dataclass(frozen=True)
class SegmentationScores:
    """miou: mean IoU over every class present (background included, as VOC); miou_foreground without it."""

    miou: float
    miou_foreground: float
    per_class: dict[str, float]
    pixel_accuracy: float
    images: int

    def to_dict(self) -> dict[str, Any]:
        return {"miou": self.miou, "miou_foreground": self.miou_foreground, "per_class_iou": self.per_class,
                "pixel_accuracy": self.pixel_accuracy, "images": self.images}


def score_masks(predicted: Sequence[np.ndarray], truth: Sequence[np.ndarray], class_names: Sequence[str]
                ) -> SegmentationScores:
    """Per-class IoU and mIoU of predicted class masks against ground truth, both at the original image size."""
    if len(predicted) != len(truth):
        raise ValueError(f"{len(predicted)} predicted masks for {len(truth)} ground-truth masks")
    cm = ConfusionMatrix(len(class_names))
    for p, t in zip(predicted, truth):
        cm.update(np.asarray(p), np.asarray(t))
    iou = cm.iou()
    total = cm.counts.sum()
    return SegmentationScores(
        miou=float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
        miou_foreground=float(np.nanmean(iou[1:])) if np.isfinite(iou[1:]).any() else 0.0,
        per_class={str(n): float(v) for n, v in zip(class_names, iou)},
        pixel_accuracy=float(np.diag(cm.counts).sum() / total) if total else 0.0,
        images=len(predicted))
