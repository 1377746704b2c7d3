"""The letterbox geometry, until serving.preprocess.letterbox lands (then this module only re-exports it).

The rule (the serving contract): scale = S / max(w, h); new_w = max(1, round(w * scale)),
new_h = max(1, round(h * scale)); resized with PIL BILINEAR; pasted at
pad_x = (S - new_w) // 2, pad_y = (S - new_h) // 2 onto an S x S canvas of value ``fill``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Letterbox:
    """What a letterbox did to one image, so boxes and masks can be taken back to the original."""

    width: int
    height: int
    scale_x: float
    scale_y: float
    pad_x: int
    pad_y: int

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        """x1, y1, x2, y2 in model-input pixels -> original pixels, clipped to the image."""
        b = np.asarray(boxes, dtype=np.float32).copy()
        b[..., 0::2] = np.clip((b[..., 0::2] - self.pad_x) / self.scale_x, 0, self.width)
        b[..., 1::2] = np.clip((b[..., 1::2] - self.pad_y) / self.scale_y, 0, self.height)
        return b

    def mask_to_original(self, mask: np.ndarray) -> np.ndarray:
        """A [S, S] label mask -> [height, width] (nearest), the padding cut away."""
        new_w, new_h = round(self.width * self.scale_x), round(self.height * self.scale_y)
        inner = np.ascontiguousarray(mask[self.pad_y:self.pad_y + new_h, self.pad_x:self.pad_x + new_w])
        return np.asarray(Image.fromarray(inner).resize((self.width, self.height), Image.Resampling.NEAREST))


def letterbox(img: Image.Image, size: int, fill: int = 114) -> tuple[np.ndarray, Letterbox]:
    """Fit ``img`` into size x size keeping its aspect ratio; uint8 [S, S, 3] (or [S, S]) and the record."""
    w, h = img.size
    scale = size / max(w, h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = img.resize((new_w, new_h), Image.Resampling.BILINEAR) if (new_w, new_h) != (w, h) else img
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    canvas = Image.new(img.mode, (size, size), (fill,) * len(img.getbands()) if len(img.getbands()) > 1 else fill)
    canvas.paste(resized, (pad_x, pad_y))
    return np.asarray(canvas), Letterbox(w, h, new_w / w, new_h / h, pad_x, pad_y)
