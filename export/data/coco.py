"""COCO instance annotations: the JSON a detection user has, read without pycocotools.

``CocoDetection`` gives ``(PIL RGB image, {"boxes": float32 [n, 4] x1 y1 x2 y2, "labels": int64 [n],
"image_id": int})`` items; labels are 0-based indices into the categories sorted by id (COCO ids
are arbitrary, the model's outputs are contiguous). Crowd annotations are skipped, as torchvision's
detection references do for training.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE of a bool [h, w] mask: run lengths in column-major order, starting with zeros."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    changes = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def xyxy_to_xywh(box: tuple[float, float, float, float]) -> list[float]:
    x1, y1, x2, y2 = box
    return [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]


class CocoDetection:
    """A COCO instances file over an image directory (see the module docstring)."""

    def __init__(self, images_dir: Path, annotation_file: Path, *, transforms: Callable | None = None,
                 cache: bool = False) -> None:
        self.images_dir = Path(images_dir)
        data = json.loads(Path(annotation_file).read_text())
        cats = sorted(data.get("categories", []), key=lambda c: c["id"])
        if not cats:
            raise ValueError(f"{annotation_file}: no categories")
        self.category_ids = [int(c["id"]) for c in cats]
        self.classes = [str(c["name"]) for c in cats]
        index_of = {cid: i for i, cid in enumerate(self.category_ids)}
        self.images = sorted(data["images"], key=lambda im: im["id"])
        per_image: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for ann in data.get("annotations", []):
            if not ann.get("iscrowd", 0) and ann["image_id"] in per_image:
                per_image[ann["image_id"]].append(ann)
        self._targets = []
        for im in self.images:
            anns = per_image[im["id"]]
            boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=np.float32).reshape(-1, 4)
            labels = np.array([index_of[a["category_id"]] for a in anns], dtype=np.int64)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            self._targets.append((boxes[keep], labels[keep]))
        self.transforms = transforms
        self._cache: dict[int, Image.Image] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, index: int) -> Path:
        return self.images_dir / self.images[index]["file_name"]

    def raw(self, index: int) -> tuple[Image.Image, dict[str, Any]]:
        if self._cache is not None and index in self._cache:
            image = self._cache[index]
        else:
            with Image.open(self.image_path(index)) as img:
                image = img.convert("RGB")
            if self._cache is not None:
                self._cache[index] = image
        boxes, labels = self._targets[index]
        return image, {"boxes": boxes.copy(), "labels": labels.copy(), "image_id": int(self.images[index]["id"])}

    def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
        image, target = self.raw(index)
        return self.transforms(image, target) if self.transforms is not None else (image, target)
