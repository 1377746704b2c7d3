"""What the experiments share: in-memory shapes data, seeding, JSON output and plotting."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from export.data.shapes import ShapesConfig, generate
from export.engine import seed_everything
from export.models import IMAGENET_MEAN, IMAGENET_STD
from export.progress import progress_bar

# Runs write here unless told otherwise; the committed results under docs/experiments/ are refreshed only
# by asking for them (--out docs/experiments), so trying an experiment never rewrites tracked files.
DEFAULT_OUT = Path("runs/experiments")


@dataclass(frozen=True)
class TensorData:
    """Images as normalized float tensors [N, 3, R, R] and int64 labels [N]."""

    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def shapes_tensors(split: str, *, per_class: int, res: int, classes: int = 10, size: int = 64, seed: int = 0,
                   progress: bool = False) -> TensorData:
    """Shapes images generated in memory, resized (shorter side) and centre-cropped to res x res.

    Normalized with the ImageNet mean/std like every registry RGB model; the
    same (seed, split, class, index) gives the same image as ``make-dataset``.
    """
    config = ShapesConfig(classes=classes, size=size, seed=seed)
    images, labels = [], []
    bar = progress_bar(total=classes * per_class, enabled=progress, desc=f"shapes {split}", unit="img", leave=False)
    for c in range(classes):
        for i in range(per_class):
            img = generate(config, split, c, i)
            scale = res / min(img.size)
            img = img.resize((max(res, round(img.width * scale)), max(res, round(img.height * scale))),
                             Image.BILINEAR)
            left, top = (img.width - res) // 2, (img.height - res) // 2
            images.append(np.asarray(img.crop((left, top, left + res, top + res)), dtype=np.uint8))
            labels.append(c)
            bar.update()
    bar.close()
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return TensorData((x - mean) / std, torch.tensor(labels, dtype=torch.int64), config.class_names)


def mnist_tensors(split: str) -> TensorData:
    """The bundled MNIST sample (export.data.mnist's fixed split: 4,000 train, 1,000 held out) as [N, 1, 28, 28]."""
    from export.data.mnist import mnist_split
    from export.models import MNIST_MEAN, MNIST_STD

    part = getattr(mnist_split(), {"train": "train", "val": "test"}[split])
    x = torch.from_numpy(part.images).float().unsqueeze(1) / 255.0
    return TensorData((x - MNIST_MEAN[0]) / MNIST_STD[0], torch.from_numpy(part.labels),
                      tuple(str(i) for i in range(10)))


def load_data(data: str, *, res: int, train_samples: int | None, seed: int,
              progress: bool = False) -> tuple[TensorData, TensorData]:
    """(train, val): MNIST (28x28x1) or shapes (res x res x 3); ``train_samples`` takes a seeded random subset."""
    if data == "mnist":
        train, val = mnist_tensors("train"), mnist_tensors("val")
    elif data == "shapes":
        per_class = max(1, (train_samples or 2000) // 10)
        train = shapes_tensors("train", per_class=per_class, res=res, seed=seed, progress=progress)
        val = shapes_tensors("val", per_class=50, res=res, seed=seed, progress=progress)
    else:
        raise ValueError(f"data must be mnist or shapes, got {data!r}")
    if train_samples is not None and train_samples < len(train.y):
        g = torch.Generator()
        g.manual_seed(seed)
        pick = torch.randperm(len(train.y), generator=g)[:train_samples]  # random: the file is sorted by label
        train = TensorData(train.x[pick], train.y[pick], train.classes)
    return train, val


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled split of range(n) into batches (the last one may be short)."""
    order = torch.randperm(n, generator=generator)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def seeded(seed: int) -> torch.Generator:
    seed_everything(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def save_figure(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as PNG (creating its folder) and release it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def write_json(path: Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_plain) + "\n")
    os.replace(tmp, path)
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def chance_loss(num_classes: int) -> float:
    """Cross-entropy of the uniform prediction: where an untrained classifier sits."""
    return math.log(num_classes)
