"""The segmentation recipe: a small U-Net on VOC-style masks (``imgserve train --task segmentation``).

    imgserve make-dataset scenes data/scenes
    imgserve train --config configs/unet_scenes.yaml --data data/scenes --output runs/unet \\
        --export-to model_repository --name unet_scenes

Data: ``DATA/SPLIT/images`` with ``DATA/SPLIT/SegmentationClass`` palette PNGs and ``DATA/labels.txt``
(class names, background first) (export/data/voc.py). Training images and masks go through the same
colour jitter, random letterbox and flips (export/data/dense_augment.py); the loss is per-pixel cross
entropy plus soft Dice (255 = void is ignored), and cross entropy on the U-Net's auxiliary
stride-8 head (weight 0.4). Validation predicts through the serving graph on the serving
letterbox, takes the masks back to the original size and computes mIoU (export/evaluation/scoring.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.data.dense_augment import train_transforms
from export.data.make_dataset import LABELS_FILE, ScenesLayout
from export.data.voc import VOID, VocSegmentation
from export.dense_export import SegmentationGraph, export_dense_to_repository
from export.evaluation.predictors import LetterboxSegmenter
from export.evaluation.scoring import score_masks
from export.models import ModelEntry
from export.onnx_export import ServingGraph
from export.recipes import common
from export.recipes.pretrain import mask_objects


AUX_WEIGHT = 0.4


class MaskSample:
    """Augment one (image, {"mask"}) pair: (uint8 [S, S, 3] tensor, int64 [S, S] mask tensor)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.augment = train_transforms(args.size, zoom=(args.zoom_min, args.zoom_max), aspect=args.aspect,
                                        flip_p=args.hflip, colour=args.colour, crop=args.train_crop)

    def __call__(self, image: Any, target: dict) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, target = self.augment(image, target)
        return torch.from_numpy(np.array(pixels)), torch.from_numpy(target["mask"].astype(np.int64))


def soft_dice_loss(logits: torch.Tensor, masks: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of the soft Dice coefficient over the batch (void pixels left out).

    Cross entropy alone is dominated by the background (most pixels); Dice weighs every class by its own
    overlap, so small foreground objects pull as hard as the background.
    """
    num_classes = logits.shape[1]
    valid = (masks != VOID).unsqueeze(1).float()
    probs = torch.softmax(logits, dim=1) * valid
    onehot = F.one_hot(masks.clamp_max(num_classes - 1), num_classes).permute(0, 3, 1, 2).float() * valid
    dims = (0, 2, 3)
    overlap = (probs * onehot).sum(dims)
    dice = (2 * overlap + eps) / (probs.sum(dims) + onehot.sum(dims) + eps)
    return 1 - dice.mean()


def _crop_side(text: str) -> int:
    value = int(text)
    if value < 16 or value % 16:
        raise argparse.ArgumentTypeError(f"must be a multiple of 16 (the U-Net's deepest stride), got {value}")
    return value


def read_class_names(root: Path) -> list[str]:
    path = Path(root) / LABELS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the segmentation classes, one per line, background first")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class SegmentationTask:
    name = "segmentation"
    default_model = "unet_tiny"
    primary_metric = "miou"

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--train-crop", type=_crop_side, default=None,
                            help="train on random C x C windows of the S x S letterboxed scenes (a multiple of 16; "
                                 "default: whole images). Validation and export stay at S")

    def datasets(self, args: argparse.Namespace, entry: ModelEntry) -> common.Datasets:
        train_split, val_split = ScenesLayout(args.data, args.train_split), ScenesLayout(args.data, args.val_split)
        train = VocSegmentation(train_split.images, train_split.masks, transforms=MaskSample(args), cache=args.cache)
        val = VocSegmentation(val_split.images, val_split.masks, cache=True)
        return common.Datasets(train=train, val=val, labels=read_class_names(args.data))

    def objects(self, data: common.Datasets) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
        train: VocSegmentation = data.train
        for index in range(len(train)):
            image, mask = train.raw(index)
            boxes, labels = mask_objects(np.asarray(mask), len(data.labels))
            yield image, boxes, labels

    def object_classes(self, data: common.Datasets) -> int:
        return len(data.labels) - 1  # the background is no object

    def loss(self, model: nn.Module, graph: ServingGraph, batch: Sequence[torch.Tensor], device: torch.device
             ) -> tuple[torch.Tensor, dict[str, float]]:
        images, masks = (t.to(device) for t in batch)
        out = graph.logits(images)
        logits, aux = out if isinstance(out, tuple) else (out, None)
        logits = logits.float()
        ce = F.cross_entropy(logits, masks, ignore_index=VOID)
        dice = soft_dice_loss(logits, masks)
        parts = {"ce_loss": float(ce.detach()), "dice_loss": float(dice.detach())}
        total = ce + dice
        if aux is not None:  # deep supervision: the masks at the auxiliary head's stride, centre-sampled
            step = masks.shape[-1] // aux.shape[-1]
            aux_loss = F.cross_entropy(aux.float(), masks[:, step // 2::step, step // 2::step], ignore_index=VOID)
            total = total + AUX_WEIGHT * aux_loss
            parts["aux_loss"] = float(aux_loss.detach())
        return total, parts

    @torch.no_grad()
    def evaluate(self, model: nn.Module, entry: ModelEntry, data: common.Datasets, args: argparse.Namespace
                 ) -> dict[str, Any]:
        model.eval()
        device = next(model.parameters()).device
        graph = SegmentationGraph(model, entry.mean, entry.std, channels=entry.channels, crop=args.size).to(device).eval()

        def run(batch: np.ndarray) -> dict[str, np.ndarray]:
            labels, probabilities = graph(torch.from_numpy(batch).to(device))
            return {"labels": labels.cpu().numpy(), "probabilities": probabilities.cpu().numpy()}

        val: VocSegmentation = data.val
        pairs = [val.raw(i) for i in range(len(val))]
        predicted = LetterboxSegmenter(run, args.size).predict_images([image for image, _ in pairs])
        scores = score_masks(predicted, [mask for _, mask in pairs], data.labels)
        return {"miou": scores.miou, "miou_foreground": scores.miou_foreground,
                "pixel_accuracy": scores.pixel_accuracy, "per_class_iou": scores.per_class}

    def export(self, model: nn.Module, entry: ModelEntry, data: common.Datasets, args: argparse.Namespace,
               metrics: dict[str, Any]) -> Any:
        val: VocSegmentation = data.val
        sample = common.letterboxed_sample([val.raw(i)[0] for i in range(min(8, len(val)))], args.size)
        return export_dense_to_repository(
            model, entry, args.export_to, args.name, data.labels, size=args.size, images=sample, gpu=args.export_gpu,
            description=f"{args.model} segmenter trained on {args.data.name or args.data} (val mIoU {metrics['miou']:.3f})")


TASK = SegmentationTask()


def main(argv: Sequence[str] | None = None) -> int:
    return common.main(TASK, argv)


if __name__ == "__main__":
    sys.exit(main())
