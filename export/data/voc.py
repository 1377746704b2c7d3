"""VOC-style segmentation masks: palette PNGs whose pixel values are class indices.

The layout a user of Pascal VOC has: an image directory and a ``SegmentationClass`` directory of
"P"-mode PNGs with the same stems (0 = background, 255 = void, ignored by training and scoring),
optionally an ``ImageSets/Segmentation/<split>.txt`` list of stems. The palette only colours the
file for viewers; readers use the indices.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

VOID = 255
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def voc_palette() -> list[int]:
    """Pascal VOC's colour map (flat RGB list, 256 entries): class k gets the bits of k spread over R, G, B."""
    palette = []
    for k in range(256):
        r = g = b = 0
        c = k
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


_PALETTE = voc_palette()


def save_palette_mask(mask: np.ndarray, path: Path) -> None:
    """Write a uint8 [H, W] class-index mask as a VOC palette PNG."""
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"a mask is uint8 [H, W], got {mask.dtype} {mask.shape}")
    img = Image.fromarray(mask, mode="P")
    img.putpalette(_PALETTE)
    img.save(path, format="PNG", optimize=False, compress_level=6)


def load_mask(path: Path) -> np.ndarray:
    """A palette (or greyscale) PNG -> uint8 [H, W] class indices; RGB masks are refused (ambiguous)."""
    with Image.open(path) as img:
        if img.mode not in ("P", "L"):
            raise ValueError(f"{path}: a class mask must be a palette or greyscale PNG, not {img.mode}")
        return np.array(img, dtype=np.uint8)


class VocSegmentation:
    """Images and their class masks, paired by file stem: ``(PIL RGB image, uint8 [H, W] mask)`` items.

    ``ids`` (or ``list_file``, one stem per line as in VOC's ImageSets) picks and orders the items;
    by default every mask in ``masks_dir`` with an image of the same stem. ``transforms(image,
    target)`` gets ``{"mask": mask}`` and returns its own pair.
    """

    def __init__(self, images_dir: Path, masks_dir: Path, *, ids: Sequence[str] | None = None,
                 list_file: Path | None = None, transforms: Callable | None = None, cache: bool = False) -> None:
        self.images_dir, self.masks_dir = Path(images_dir), Path(masks_dir)
        if ids is None and list_file is not None:
            ids = [line.strip() for line in Path(list_file).read_text().splitlines() if line.strip()]
        if ids is None:
            ids = sorted(p.stem for p in self.masks_dir.glob("*.png"))
        images = {p.stem: p for p in self.images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        missing = [i for i in ids if i not in images or not (self.masks_dir / f"{i}.png").is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} item(s) lack an image in {self.images_dir} or a mask in "
                                    f"{self.masks_dir}, e.g. {missing[0]!r}")
        if not ids:
            raise FileNotFoundError(f"no masks in {self.masks_dir}")
        self.ids = list(ids)
        self.image_paths = [images[i] for i in self.ids]
        self.transforms = transforms
        self._cache: dict[int, tuple[Image.Image, np.ndarray]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.ids)

    def raw(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """The image and mask as stored (cached in memory when asked: the scenes fit easily)."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        with Image.open(self.image_paths[index]) as img:
            image = img.convert("RGB")
        mask = load_mask(self.masks_dir / f"{self.ids[index]}.png")
        if mask.shape != (image.height, image.width):
            raise ValueError(f"{self.ids[index]}: mask {mask.shape[::-1]} differs from image {image.size}")
        if self._cache is not None:
            self._cache[index] = (image, mask)
        return image, mask

    def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
        image, mask = self.raw(index)
        target = {"mask": mask, "image_id": index}
        return self.transforms(image, target) if self.transforms is not None else (image, target)
