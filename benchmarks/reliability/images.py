"""Synthetic test images for the reliability figures and tests (deterministic, compressible PNGs)."""
from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image


@functools.lru_cache(maxsize=8)
def large_png(side: int, channels: int = 3, noise_every: int = 0) -> bytes:
    """A side x side PNG of diagonal stripes: slow to decode (every pixel is real work), small on the wire.

    ``noise_every`` > 0 adds a row of noise every that many rows (bigger file, slower inflate).
    """
    plane = (np.add.outer(np.arange(side, dtype=np.uint32), np.arange(side, dtype=np.uint32)) % 251).astype(np.uint8)
    if noise_every:
        rng = np.random.default_rng(0)
        plane[::noise_every] = rng.integers(0, 255, plane[::noise_every].shape, dtype=np.uint8)
    pixels = plane if channels == 1 else np.stack([plane, plane.T, plane // 2], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=6)
    return buf.getvalue()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``; 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(np.ceil(q / 100.0 * len(ordered))) - 1))
    return ordered[rank]
