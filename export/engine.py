"""The training engine every trainer shares: one epoch, validation, metrics, checkpoints, seeding.

Trainers (``export/lenet.py`` for MNIST, ``export/train.py`` for ImageFolder
data) own their data and model choices and call these functions, so the
training loop, its numbers and its files look the same everywhere.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from export.precision import autocast
from export.progress import progress_bar

METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
METRICS_PNG = "metrics.png"


@dataclass(frozen=True)
class EpochStats:
    """What one training epoch did; loss/accuracy are sample-weighted means over the epoch."""

    loss: float
    accuracy: float
    samples: int
    seconds: float
    lr: float


@dataclass(frozen=True)
class EvalStats:
    """Validation numbers: mean cross-entropy and top-1 accuracy."""

    loss: float
    accuracy: float
    samples: int
    seconds: float


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so a run can be repeated.

    ``deterministic`` also asks cuDNN for deterministic kernels, trading speed for bit-exact reruns on GPU.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def train_one_epoch(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, criterion: nn.Module, device: torch.device | str, *,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    scaler: torch.amp.GradScaler | None = None, amp: str = "off", channels_last: bool = False,
                    progress: bool = True, desc: str = "train", max_grad_norm: float | None = None) -> EpochStats:
    """Run one pass over ``loader`` and update ``model``.

    ``scheduler`` (optional) is stepped after every optimizer step, i.e. it is a
    per-iteration schedule (size it as epochs * len(loader)); per-epoch
    schedules are stepped by the caller instead. ``amp`` is a resolved mode of
    export/precision.py (``off``, ``bf16`` or ``fp16``); with ``fp16`` pass the
    caller's ``scaler`` (it is checkpointed) to scale the loss. A non-finite
    loss raises FloatingPointError at once rather than silently wrecking the weights.
    """
    device = torch.device(device)
    model.train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = progress_bar(loader, enabled=progress, desc=desc, leave=False, unit="batch")
    for images, targets in bar:
        images = _to_device(images, device, channels_last)
        targets = targets.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, amp):
            logits = model(images)
            loss = criterion(logits, targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} after {seen} samples; lower the learning rate")
        if scaler is not None:
            scaler.scale(loss).backward()
            if max_grad_norm is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = int(targets.shape[0])
        total_loss += float(loss.detach()) * n
        correct += int((logits.detach().argmax(dim=1) == targets).sum())
        seen += n
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}", lr=f"{_current_lr(optimizer):.3g}")
    bar.close()
    if seen == 0:
        raise ValueError("the training loader yielded no samples")
    return EpochStats(loss=total_loss / seen, accuracy=correct / seen, samples=seen,
                      seconds=time.perf_counter() - start, lr=_current_lr(optimizer))


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device | str, *,
            channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets for a whole loader (eval mode), on the CPU."""
    device = torch.device(device)
    model.eval()
    all_logits, all_targets = [], []
    for images, targets in loader:
        all_logits.append(model(_to_device(images, device, channels_last)).float().cpu())
        all_targets.append(targets.cpu())
    if not all_logits:
        raise ValueError("the evaluation loader yielded no samples")
    return torch.cat(all_logits), torch.cat(all_targets)


@torch.no_grad()
def validate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], criterion: nn.Module,
             device: torch.device | str, *, channels_last: bool = False) -> EvalStats:
    """Mean loss and top-1 accuracy of ``model`` (eval mode) over ``loader``."""
    start = time.perf_counter()
    logits, targets = predict(model, loader, device, channels_last=channels_last)
    loss = float(criterion(logits, targets))
    samples = int(targets.shape[0])
    accuracy = int((logits.argmax(dim=1) == targets).sum()) / samples
    return EvalStats(loss=loss, accuracy=accuracy, samples=samples,
                     seconds=time.perf_counter() - start)


# ------------------------------------------------------------------ metrics

@dataclass
class MetricsLog:
    """Per-epoch rows, written as metrics.json, metrics.csv and a loss/accuracy plot (metrics.png).

    Every row has an ``epoch`` plus any numeric columns; columns whose name
    contains "loss" go on the loss panel, those containing "acc" on the
    accuracy panel. ``summary`` holds run-level facts (final accuracy, timings).
    """

    out_dir: Path
    rows: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)

    @property
    def json_path(self) -> Path:
        return self.out_dir / METRICS_JSON

    @property
    def csv_path(self) -> Path:
        return self.out_dir / METRICS_CSV

    @property
    def png_path(self) -> Path:
        return self.out_dir / METRICS_PNG

    def append(self, epoch: int, **values: float) -> dict[str, float]:
        row: dict[str, float] = {"epoch": epoch}
        for key, value in values.items():
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"metric {key}={value} is not finite")
            row[key] = value
        # A resumed run re-logs from its checkpoint epoch on: keep only the latest row per epoch.
        self.rows = [r for r in self.rows if r["epoch"] != epoch] + [row]
        return row

    def write(self, *, plot: bool = True) -> None:
        """Write all three files (atomically each), so a crash mid-run leaves the previous epoch's files intact."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.json_path, json.dumps({"epochs": self.rows, "summary": self.summary}, indent=2) + "\n")
        columns = ["epoch"] + sorted({k for r in self.rows for k in r} - {"epoch"})
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.csv_path)
        if plot and self.rows:
            self.plot(self.png_path)

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in self.rows]
        keys = sorted({k for r in self.rows for k in r} - {"epoch"})
        panels = [("loss", [k for k in keys if "loss" in k]), ("accuracy", [k for k in keys if "acc" in k])]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, (title, cols) in zip(axes, panels):
            for col in cols:
                xs = [e for e, r in zip(epochs, self.rows) if col in r]
                ys = [r[col] for r in self.rows if col in r]
                ax.plot(xs, ys, marker="o", markersize=3, label=col)
            ax.set_xlabel("epoch")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            if cols:
                ax.legend()
        fig.tight_layout()
        tmp = path.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, path)

    @classmethod
    def load(cls, out_dir: Path) -> "MetricsLog":
        """Re-open an earlier run's metrics (for --resume); an absent file gives an empty log."""
        log = cls(Path(out_dir))
        if log.json_path.is_file():
            data = json.loads(log.json_path.read_text())
            log.rows = [dict(r) for r in data.get("epochs", [])]
            log.summary = dict(data.get("summary", {}))
        return log


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------ checkpoints

@dataclass(frozen=True)
class CheckpointState:
    """Where a resumed run continues: the next epoch to run and the best accuracy so far."""

    epoch: int
    best_accuracy: float
    extra: dict[str, Any]

    @property
    def next_epoch(self) -> int:
        return self.epoch + 1


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                    epoch: int, best_accuracy: float,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    scaler: torch.amp.GradScaler | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Save everything --resume needs, atomically (write to a temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "format": "imgserve-checkpoint-v1",
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": int(epoch),
        "best_accuracy": float(best_accuracy),
        "extra": dict(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    scaler: torch.amp.GradScaler | None = None,
                    map_location: str | torch.device = "cpu") -> CheckpointState:
    """Restore a checkpoint written by save_checkpoint into the given objects (those passed as None are skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != "imgserve-checkpoint-v1":
        raise ValueError(f"{path} is not an imgserve checkpoint")
    model.load_state_dict(state["model"])
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            if state[name] is None:
                raise ValueError(f"{path} holds no {name} state to resume from")
            obj.load_state_dict(state[name])
    return CheckpointState(epoch=int(state["epoch"]), best_accuracy=float(state["best_accuracy"]),
                           extra=dict(state["extra"]))


def stats_dict(prefix: str, stats: EpochStats | EvalStats) -> dict[str, float]:
    """Flatten stats into prefixed metric columns, e.g. train_loss, train_acc."""
    d = asdict(stats)
    out = {f"{prefix}_loss": d["loss"], f"{prefix}_acc": d["accuracy"], f"{prefix}_seconds": d["seconds"]}
    if "lr" in d:
        out["lr"] = d["lr"]
    return out
