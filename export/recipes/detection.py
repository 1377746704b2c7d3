"""The detection recipe: a CenterNet-style detector on COCO instances (``imgserve train --task detection``).

    imgserve make-dataset scenes data/scenes
    imgserve train --config configs/centernet_scenes.yaml --data data/scenes --output runs/centernet \\
        --export-to model_repository --name centernet_scenes

Data: ``DATA/annotations/instances_SPLIT.json`` over ``DATA/SPLIT/images`` (export/data/coco.py).
Training images go through colour jitter, a random letterbox (zoom, aspect, position) and flips
(export/data/dense_augment.py), then CenterNet targets (export/centernet.py). Validation runs the
serving graph's own decoding on the serving letterbox, maps boxes back to the original pixels and
scores them with pycocotools (export/evaluation/scoring.py); the best epoch by mAP@[.5:.95] is kept.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from export.centernet import centernet_loss, encode
from export.data.coco import CocoDetection
from export.data.dense_augment import train_transforms
from export.data.make_dataset import ScenesLayout
from export.dense_models import DETECTOR_STRIDE
from export.dense_export import (DEFAULT_MAX_DETECTIONS, DEFAULT_SCORE_THRESHOLD, DetectionGraph,
                                 export_dense_to_repository)
from export.evaluation.predictors import LetterboxDetector
from export.evaluation.scoring import score_detections
from export.models import ModelEntry
from export.onnx_export import ServingGraph
from export.recipes import common


class CenterNetSample:
    """Augment one (image, target) and encode it: (uint8 [S, S, 3] tensor, heatmap, box, weight)."""

    def __init__(self, args: argparse.Namespace, num_classes: int, stride: int) -> None:
        self.augment = train_transforms(args.size, zoom=(args.zoom_min, args.zoom_max), aspect=args.aspect,
                                        flip_p=args.hflip, colour=args.colour)
        self.size, self.num_classes, self.stride = args.size, num_classes, stride

    def __call__(self, image: Any, target: dict) -> tuple[torch.Tensor, ...]:
        pixels, target = self.augment(image, target)
        enc = encode(target["boxes"], target["labels"], num_classes=self.num_classes, input_size=self.size,
                     stride=self.stride)
        return (torch.from_numpy(np.array(pixels)), torch.from_numpy(enc.heatmap), torch.from_numpy(enc.box),
                torch.from_numpy(enc.weight))


class DetectionTask:
    name = "detection"
    default_model = "centernet_tiny"
    primary_metric = "map"

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("detection")
        g.add_argument("--max-detections", type=int, default=DEFAULT_MAX_DETECTIONS,
                       help="K: detections the exported graph returns per image (and validation scores)")
        g.add_argument("--score-threshold", type=float, default=DEFAULT_SCORE_THRESHOLD,
                       help="the served model's default score threshold (requests may set their own)")

    def datasets(self, args: argparse.Namespace, entry: ModelEntry) -> common.Datasets:
        train_split, val_split = ScenesLayout(args.data, args.train_split), ScenesLayout(args.data, args.val_split)
        train = CocoDetection(train_split.images, train_split.annotations, cache=args.cache)
        val = CocoDetection(val_split.images, val_split.annotations, cache=True)
        if train.classes != val.classes:
            raise ValueError(f"the {args.train_split} and {args.val_split} splits have different categories")
        train.transforms = CenterNetSample(args, len(train.classes), stride=DETECTOR_STRIDE)
        return common.Datasets(train=train, val=val, labels=list(train.classes),
                               extra={"annotations": val_split.annotations})

    def objects(self, data: common.Datasets) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
        train: CocoDetection = data.train
        for index in range(len(train)):
            image, target = train.raw(index)
            yield image, target["boxes"], target["labels"]

    def object_classes(self, data: common.Datasets) -> int:
        return len(data.labels)

    def loss(self, model: nn.Module, graph: ServingGraph, batch: Sequence[torch.Tensor], device: torch.device
             ) -> tuple[torch.Tensor, dict[str, float]]:
        images, heatmap, box, weight = (t.to(device) for t in batch)
        heat, ltrb = (t.float() for t in graph.logits(images))   # float32 losses under --amp bf16
        return centernet_loss(heat, ltrb, {"heatmap": heatmap, "box": box, "weight": weight}, stride=model.stride)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, entry: ModelEntry, data: common.Datasets, args: argparse.Namespace
                 ) -> dict[str, Any]:
        model.eval()
        device = next(model.parameters()).device
        graph = DetectionGraph(model, entry, size=args.size, k=args.max_detections).to(device).eval()
        names = ("num_detections", "detection_boxes", "detection_scores", "detection_classes")

        def run(batch: np.ndarray) -> dict[str, np.ndarray]:
            return dict(zip(names, (t.cpu().numpy() for t in graph(torch.from_numpy(batch).to(device)))))

        val: CocoDetection = data.val
        images = [val.raw(i)[0] for i in range(len(val))]
        detections = LetterboxDetector(run, args.size).predict_images(images)
        scores = score_detections(data.extra["annotations"], [int(im["id"]) for im in val.images], detections)
        return {"map": scores.map, "map50": scores.map50, "map75": scores.map75, "per_class_ap": scores.per_class}

    def export(self, model: nn.Module, entry: ModelEntry, data: common.Datasets, args: argparse.Namespace,
               metrics: dict[str, Any]) -> Any:
        val: CocoDetection = data.val
        sample = common.letterboxed_sample([val.raw(i)[0] for i in range(min(8, len(val)))], args.size)
        return export_dense_to_repository(
            model, entry, args.export_to, args.name, data.labels, size=args.size, images=sample,
            max_detections=args.max_detections, score_threshold=args.score_threshold, gpu=args.export_gpu,
            description=f"{args.model} detector trained on {args.data.name or args.data} "
                        f"(val mAP {metrics['map']:.3f}, mAP@0.5 {metrics['map50']:.3f})")


TASK = DetectionTask()


def main(argv: Sequence[str] | None = None) -> int:
    return common.main(TASK, argv)


if __name__ == "__main__":
    sys.exit(main())
