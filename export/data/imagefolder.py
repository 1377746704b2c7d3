"""ImageFolder datasets for training: ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*``.

A thin layer over torchvision's ImageFolder that adds what a trainer needs to
get right: both splits must have the same classes (the label index of a class
is its position in the sorted folder names, and the exported labels.txt uses
that order), images load as "L" or "RGB" to match the model, and loaders are
seeded so a run can be repeated.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS


class DatasetError(ValueError):
    """The data directory is missing, empty or inconsistent."""


@dataclass(frozen=True)
class SplitDirs:
    """Where the two splits are."""

    train: Path
    val: Path


def resolve_splits(data: Path | None, train_dir: Path | None = None, val_dir: Path | None = None) -> SplitDirs:
    """``DATA/train`` and ``DATA/val``, unless given explicitly; every directory must exist."""
    if data is None and (train_dir is None or val_dir is None):
        raise DatasetError("give --data DIR (holding train/ and val/) or both --train-dir and --val-dir")
    train = Path(train_dir) if train_dir is not None else Path(data) / "train"  # type: ignore[arg-type]
    val = Path(val_dir) if val_dir is not None else Path(data) / "val"  # type: ignore[arg-type]
    for name, path in (("training", train), ("validation", val)):
        if not path.is_dir():
            raise DatasetError(f"{name} directory {path} does not exist (expected one sub-folder per class)")
    return SplitDirs(train, val)


def _load(path: str, mode: str) -> Image.Image:
    with open(path, "rb") as fh:
        img = Image.open(fh)
        return img.convert(mode)


def image_folder(root: Path, transform: Callable | None, channels: int = 3) -> ImageFolder:
    """An ImageFolder whose images are converted to "L" (channels=1) or "RGB" (channels=3)."""
    if channels not in (1, 3):
        raise DatasetError(f"channels must be 1 or 3, got {channels}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory")
    try:
        return ImageFolder(str(root), transform=transform,
                           loader=functools.partial(_load, mode="L" if channels == 1 else "RGB"))
    except FileNotFoundError as exc:
        raise DatasetError(f"{root}: {exc} (supported extensions: {', '.join(IMG_EXTENSIONS)})") from None


def check_same_classes(train: ImageFolder, val: ImageFolder) -> list[str]:
    """The class names, after checking both splits agree (so label indices mean the same thing)."""
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DatasetError(f"train and val classes differ: only in train {only_train}, only in val {only_val}")
    if len(train.classes) < 2:
        raise DatasetError(f"need at least 2 classes, found {train.classes}")
    return list(train.classes)


def image_paths(dataset: ImageFolder) -> list[str]:
    return [path for path, _ in dataset.samples]


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, workers: int = 0, seed: int = 0,
                drop_last: bool = False, pin_memory: bool = False) -> DataLoader:
    """A DataLoader whose shuffling and worker augmentations depend only on ``seed``.

    torch seeds each worker's ``random`` and torch generators from the loader's
    generator, so seeding it here makes multi-worker augmentation repeatable.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      generator=generator, drop_last=drop_last, pin_memory=pin_memory,
                      persistent_workers=False)  # fresh workers each epoch: reseeded from the generator
