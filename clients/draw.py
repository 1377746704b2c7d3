"""Pictures of results for people: boxes with labels, and mask overlays (Pillow only)."""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from clients.types import Detection

# Distinct, saturated colours for class indices (cycled for more classes).
COLOURS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]


def colour(index: int) -> tuple[int, int, int]:
    return COLOURS[index % len(COLOURS)]


def open_rgb(data: bytes) -> Image.Image:
    """The image as the gateway saw it: EXIF orientation applied, RGB."""
    with Image.open(io.BytesIO(data)) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


def draw_detections(data: bytes, detections: Sequence[Detection], *, line: int | None = None) -> Image.Image:
    """The image with a rectangle and a "label score" tag per detection."""
    img = open_rgb(data)
    pen = ImageDraw.Draw(img)
    width = line or max(1, round(max(img.size) / 300))
    for det in detections:
        x1, y1, x2, y2 = det.box
        c = colour(det.index)
        pen.rectangle((x1, y1, x2, y2), outline=c, width=width)
        tag = f"{det.label} {det.score:.2f}"
        left, top, right, bottom = pen.textbbox((x1, y1), tag)
        ty = y1 - (bottom - top) - 2 if y1 - (bottom - top) - 2 >= 0 else y1
        pen.rectangle((x1, ty, x1 + (right - left) + 4, ty + (bottom - top) + 2), fill=c)
        pen.text((x1 + 2, ty), tag, fill=(0, 0, 0))
    return img


def overlay_mask(data: bytes, mask: np.ndarray, *, alpha: float = 0.5, background: int = 0) -> Image.Image:
    """The image with every non-background class tinted in its colour."""
    img = open_rgb(data)
    if mask.shape != (img.height, img.width):
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {img.width}x{img.height}")
    pixels = np.asarray(img, dtype=np.float32)
    tint = np.zeros_like(pixels)
    for index in np.unique(mask):
        if index != background:
            tint[mask == index] = colour(int(index))
    painted = mask != background
    pixels[painted] = (1 - alpha) * pixels[painted] + alpha * tint[painted]
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
