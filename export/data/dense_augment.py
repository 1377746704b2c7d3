"""Augmentations for detection and segmentation that move boxes and masks with the pixels.

Every transform takes and returns ``(image, target)``; ``target`` may hold ``boxes`` (float32
[n, 4], x1 y1 x2 y2 in pixels) with ``labels`` (int64 [n]) and/or ``mask`` (uint8 [H, W] class
indices). Training output is what the served graph takes: a uint8 [S, S, 3] letterboxed array.

* ``RandomLetterbox``: the serving letterbox (fit the longer side to S, pad with grey 114), then a
  random zoom (objects smaller or larger than at serving), aspect-ratio jitter and a random position
  in the canvas; zoomed-in images are cropped, and boxes that keep too little of themselves are
  dropped. Masks follow with nearest-neighbour resampling and pad with background (0).
* ``RandomHorizontalFlip``: mirror pixels, masks and boxes (x -> S - x).
* ``RandomMaskCrop``: a random C x C window of the S x S canvas and its mask (segmentation training
  on patches: the same scale as serving at (C/S)^2 of the compute per image).
* ``ColourJitter``: brightness, contrast and saturation factors; geometry untouched.
* ``Letterbox``: the exact serving geometry (evaluation); the record to undo it goes in the target.
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from serving.preprocess import LETTERBOX_FILL, letterbox

Target = dict[str, Any]
FILL = LETTERBOX_FILL
MIN_BOX_SIDE = 2.0      # pixels in the canvas; smaller remains are not objects to find
MIN_BOX_KEPT = 0.4      # a cropped box must keep this fraction of its area to stay a target


class Compose:
    """Apply transforms in order to (image, target)."""

    def __init__(self, transforms: Sequence[Callable[[Any, Target], tuple[Any, Target]]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: Target) -> tuple[Any, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


def place_boxes(boxes: np.ndarray, labels: np.ndarray, scale_x: float, scale_y: float, off_x: float, off_y: float,
                size: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes after scaling and shifting into a size x size canvas: clipped, and dropped if mostly outside."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * np.array([scale_x, scale_y, scale_x, scale_y], np.float32)
    b += np.array([off_x, off_y, off_x, off_y], dtype=np.float32)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    c = np.clip(b, 0, size)
    w, h = c[:, 2] - c[:, 0], c[:, 3] - c[:, 1]
    keep = (w >= MIN_BOX_SIDE) & (h >= MIN_BOX_SIDE) & (w * h >= MIN_BOX_KEPT * np.maximum(area, 1e-6))
    return c[keep], np.asarray(labels)[keep]


def _place(img: Image.Image, new_w: int, new_h: int, off_x: int, off_y: int, size: int, fill: int,
           resample: Image.Resampling) -> Image.Image:
    resized = img.resize((new_w, new_h), resample) if (new_w, new_h) != img.size else img
    canvas = Image.new(img.mode, (size, size), (fill,) * 3 if img.mode == "RGB" else fill)
    canvas.paste(resized, (off_x, off_y))  # negative offsets crop, as a zoom-in should
    return canvas


class RandomLetterbox:
    """Letterbox with a random zoom in [zoom[0], zoom[1]] of the serving scale, aspect jitter and position."""

    def __init__(self, size: int, *, zoom: tuple[float, float] = (0.75, 1.25), aspect: float = 0.2,
                 fill: int = FILL) -> None:
        if not 0 < zoom[0] <= zoom[1]:
            raise ValueError(f"zoom range must be positive and ordered, got {zoom}")
        self.size, self.zoom, self.aspect, self.fill = size, zoom, aspect, fill

    def __call__(self, image: Image.Image, target: Target) -> tuple[np.ndarray, Target]:
        w, h = image.size
        base = self.size / max(w, h)
        z = random.uniform(*self.zoom)
        a = math.exp(random.uniform(-self.aspect, self.aspect))
        new_w = max(1, round(w * base * z * math.sqrt(a)))
        new_h = max(1, round(h * base * z / math.sqrt(a)))
        off_x = random.randint(min(0, self.size - new_w), max(0, self.size - new_w))
        off_y = random.randint(min(0, self.size - new_h), max(0, self.size - new_h))
        out = dict(target)
        canvas = _place(image, new_w, new_h, off_x, off_y, self.size, self.fill, Image.Resampling.BILINEAR)
        if "boxes" in target:
            out["boxes"], out["labels"] = place_boxes(target["boxes"], target["labels"], new_w / w, new_h / h,
                                                      off_x, off_y, self.size)
        if "mask" in target:
            out["mask"] = np.asarray(_place(Image.fromarray(target["mask"]), new_w, new_h, off_x, off_y, self.size, 0,
                                            Image.Resampling.NEAREST))
        return np.asarray(canvas), out


class RandomHorizontalFlip:
    """Mirror an [S, S, 3] array, its mask and boxes with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: np.ndarray, target: Target) -> tuple[np.ndarray, Target]:
        if random.random() >= self.p:
            return image, target
        out = dict(target)
        width = image.shape[1]
        if "boxes" in target:
            b = np.asarray(target["boxes"], dtype=np.float32).copy()
            b[:, [0, 2]] = width - b[:, [2, 0]]
            out["boxes"] = b
        if "mask" in target:
            out["mask"] = np.ascontiguousarray(target["mask"][:, ::-1])
        return np.ascontiguousarray(image[:, ::-1]), out


class RandomMaskCrop:
    """A random ``crop`` x ``crop`` window of an [S, S, 3] array and its mask (no boxes: segmentation only).

    Why: a segmenter is fully convolutional, so it can learn from windows of the letterboxed scene at
    the serving scale. A 96 px window of a 128 px canvas costs 56% of the compute of the whole image.
    The window prefers the picture to the letterbox's grey bars: it is drawn up to ``tries`` times
    and the first one that holds any non-background pixel is kept.
    """

    def __init__(self, crop: int, tries: int = 3) -> None:
        if crop < 1:
            raise ValueError(f"crop must be >= 1, got {crop}")
        self.crop, self.tries = crop, tries

    def __call__(self, image: np.ndarray, target: Target) -> tuple[np.ndarray, Target]:
        if "boxes" in target:
            raise ValueError("RandomMaskCrop moves masks only; crop detection targets with RandomLetterbox's zoom")
        height, width = image.shape[:2]
        if self.crop > min(height, width):
            raise ValueError(f"crop {self.crop} is larger than the {width}x{height} canvas")
        mask = target["mask"]
        for _ in range(self.tries):
            y = random.randint(0, height - self.crop)
            x = random.randint(0, width - self.crop)
            window = (slice(y, y + self.crop), slice(x, x + self.crop))
            if mask[window].any():
                break
        out = dict(target)
        out["mask"] = np.ascontiguousarray(mask[window])
        return np.ascontiguousarray(image[window]), out


class ColourJitter:
    """Random brightness, contrast and saturation factors in [1 - s, 1 + s] (PIL images, before geometry)."""

    def __init__(self, brightness: float = 0.3, contrast: float = 0.3, saturation: float = 0.3) -> None:
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation

    def __call__(self, image: Image.Image, target: Target) -> tuple[Image.Image, Target]:
        x = np.asarray(image, dtype=np.float32)
        x = x * random.uniform(1 - self.brightness, 1 + self.brightness)
        grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        x = grey.mean() + (x - grey.mean()) * random.uniform(1 - self.contrast, 1 + self.contrast)
        grey = (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
        x = grey + (x - grey) * random.uniform(1 - self.saturation, 1 + self.saturation)
        return Image.fromarray(np.clip(x, 0, 255).round().astype(np.uint8), "RGB"), target


class Letterbox:
    """The serving letterbox (evaluation): the record goes in ``target["letterbox"]``; boxes/masks stay original."""

    def __init__(self, size: int, fill: int = FILL) -> None:
        self.size, self.fill = size, fill

    def __call__(self, image: Image.Image, target: Target) -> tuple[np.ndarray, Target]:
        array, record = letterbox(image, self.size, self.fill)
        return array, {**target, "letterbox": record}


def train_transforms(size: int, *, zoom: tuple[float, float] = (0.75, 1.25), aspect: float = 0.2,
                     flip_p: float = 0.5, colour: float = 0.2, crop: int | None = None) -> Compose:
    """The training pipeline of both dense recipes: colour jitter, random letterbox, flip, and for
    segmentation optionally a random ``crop`` x ``crop`` window."""
    steps: list = [ColourJitter(colour, colour, colour)] if colour > 0 else []
    steps += [RandomLetterbox(size, zoom=zoom, aspect=aspect), RandomHorizontalFlip(flip_p)]
    if crop is not None and crop < size:
        steps.append(RandomMaskCrop(crop))
    return Compose(steps)
