"""Mask encodings a segmentation answer uses: palette PNG, class fractions and COCO RLE.

Pure numpy + Pillow, so the gateway does not need pycocotools; tests check the RLE
against pycocotools' own encoder.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def voc_palette(entries: int = 256) -> list[int]:
    """The PASCAL VOC colour map: class i gets the colour built from i's bits, 3 at a time, high bit first.

    Class 0 is black, 1 dark red, 2 dark green, ... so a mask PNG opens in any viewer
    and keeps its class indices as pixel values.
    """
    palette: list[int] = []
    for i in range(entries):
        r = g = b = 0
        c = i
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


_PALETTE = voc_palette()


def palette_png(mask: np.ndarray) -> bytes:
    """An H x W uint8 class-index mask as a palette ("P") PNG: pixel value = class index."""
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L").convert("P")
    img.putpalette(_PALETTE)
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=False, compress_level=1)
    return buf.getvalue()


def class_fractions(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """The fraction of pixels of each class 0..num_classes-1 (float64, sums to 1 over present classes)."""
    counts = np.bincount(mask.reshape(-1), minlength=num_classes)[:num_classes]
    return counts / max(1, mask.size)


def rle_counts(binary: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE of a 2-D 0/1 mask: run lengths in column-major order, zeros first."""
    flat = np.asarray(binary, dtype=bool).reshape(-1, order="F")
    if flat.size == 0:
        return []
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0] + runs
    return [int(r) for r in runs]


def rle_string(counts: list[int]) -> str:
    """COCO's compressed RLE string: each count (after the second, as the difference to the count
    two places back) in little-endian groups of 5 bits, 0x20 marking 'more groups follow', plus 48."""
    out: list[str] = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift: negative differences end at -1
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def coco_rle(binary: np.ndarray) -> dict[str, object]:
    """A COCO RLE object {"size": [h, w], "counts": str} for a 2-D 0/1 mask."""
    h, w = binary.shape
    return {"size": [int(h), int(w)], "counts": rle_string(rle_counts(binary))}
