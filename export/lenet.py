"""Train LeNet-5 on the bundled MNIST sample and report its held-out accuracy.

    python -m export.lenet --out runs/lenet5 [--epochs 25] [--seed 0]

Kaiming init (registry default), BatchNorm, SGD with momentum 0.9 and weight
decay 5e-4, a per-iteration cosine learning-rate schedule, and +-2 pixel
random shifts as the only augmentation. Writes metrics.json, metrics.csv and
metrics.png to ``--out``. Deterministic for a given seed on the CPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from export.data.mnist import MnistDataset, mnist_split
from export.engine import MetricsLog, seed_everything, stats_dict, train_one_epoch, validate
from export.models import create_model, get_entry

MODEL_NAME = "lenet5"
DEFAULT_EPOCHS = 25
MAX_THREADS = 2


@dataclass(frozen=True)
class LenetResult:
    """The outcome of a LeNet-5 run."""

    test_accuracy: float
    test_loss: float
    train_seconds: float
    epochs: int
    train_samples: int
    test_samples: int
    metrics_json: Path
    metrics_png: Path


def _loaders(batch_size: int, seed: int, max_shift: int) -> tuple[DataLoader, DataLoader]:
    entry = get_entry(MODEL_NAME)
    split = mnist_split(seed=0)  # the split is fixed; ``seed`` varies training only
    common = {"mean": entry.mean[0], "std": entry.std[0], "pad_to": entry.pad_to or 32}
    train = MnistDataset(split.train, max_shift=max_shift, seed=seed, **common)
    test = MnistDataset(split.test, max_shift=0, **common)
    shuffle_gen = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=shuffle_gen),
            DataLoader(test, batch_size=500, shuffle=False))


def train_lenet(out_dir: Path, epochs: int = DEFAULT_EPOCHS, seed: int = 0, *, lr: float = 0.05,
                batch_size: int = 64, max_shift: int = 2, progress: bool = True) -> tuple[nn.Module, LenetResult]:
    """Train from scratch on the MNIST train split; returns the model (eval mode, CPU) and its test numbers."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    out_dir = Path(out_dir)
    torch.set_num_threads(min(MAX_THREADS, torch.get_num_threads()))
    seed_everything(seed)
    device = torch.device("cpu")
    train_loader, test_loader = _loaders(batch_size, seed, max_shift)
    model = create_model(MODEL_NAME, num_classes=10).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(train_loader))
    criterion = nn.CrossEntropyLoss()
    log = MetricsLog(out_dir)
    start = time.perf_counter()
    test = None
    for epoch in range(1, epochs + 1):
        stats = train_one_epoch(model, train_loader, optimizer, criterion, device, scheduler=scheduler,
                                progress=progress, desc=f"lenet5 epoch {epoch}/{epochs}")
        test = validate(model, test_loader, criterion, device)
        log.append(epoch, **stats_dict("train", stats), **stats_dict("test", test))
        log.write(plot=False)
        if progress:
            print(f"lenet5 epoch {epoch:2d}/{epochs}: train loss {stats.loss:.4f} acc {stats.accuracy:.4f} | "
                  f"test loss {test.loss:.4f} acc {test.accuracy:.4f}", file=sys.stderr)
    train_seconds = time.perf_counter() - start
    assert test is not None
    log.summary.update({"model": MODEL_NAME, "seed": seed, "epochs": epochs, "test_accuracy": test.accuracy,
                        "test_loss": test.loss, "train_seconds": train_seconds,
                        "train_samples": len(train_loader.dataset), "test_samples": len(test_loader.dataset)})
    log.write(plot=True)
    model.eval()
    return model, LenetResult(test_accuracy=test.accuracy, test_loss=test.loss, train_seconds=train_seconds,
                              epochs=epochs, train_samples=len(train_loader.dataset),
                              test_samples=len(test_loader.dataset), metrics_json=log.json_path,
                              metrics_png=log.png_path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.lenet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/lenet5"), help="directory for metrics and the plot")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--save", type=Path, help="also save the trained state_dict here")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        parser.error("--epochs and --batch-size must be >= 1 and --lr > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model, result = train_lenet(args.out, epochs=args.epochs, seed=args.seed, lr=args.lr, batch_size=args.batch_size)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), args.save)
    print(f"lenet5: test accuracy {result.test_accuracy:.4f} on {result.test_samples} held-out digits "
          f"({result.train_seconds:.1f}s training); metrics in {result.metrics_json.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
