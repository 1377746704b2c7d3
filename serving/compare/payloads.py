"""The images every path sends, and the client-side preprocessing of the Triton-direct path."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from serving.preprocess import preprocess
from serving.repository import ModelSpec


def synthetic_images(count: int, side: int, channels: int, *, fmt: str = "PNG", seed: int = 0) -> list[bytes]:
    """``count`` smooth random images of side x side pixels, encoded as ``fmt``.

    Smooth (upsampled noise) rather than white noise: photographs compress like this, and
    white-noise PNGs would inflate upload and decode cost far beyond a real image's.
    """
    rng = np.random.default_rng(seed)
    out: list[bytes] = []
    low = max(2, side // 8)
    mode = "L" if channels == 1 else "RGB"
    for _ in range(count):
        shape = (low, low) if channels == 1 else (low, low, 3)
        small = Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode=mode)
        img = small.resize((side, side), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


def crops(data: bytes, spec: ModelSpec) -> np.ndarray:
    """What the gateway would send its backend for one image: uint8 [1, C, C, channels]."""
    return preprocess(data, spec.preprocess, ten_crop=False)


def predecoded_batch(images: list[bytes], spec: ModelSpec, size: int) -> np.ndarray:
    """``size`` crops cycling through ``images``, decoded once up front (the raw-engine path)."""
    decoded = [crops(data, spec)[0] for data in images]
    return np.ascontiguousarray(np.stack([decoded[i % len(decoded)] for i in range(size)]))
