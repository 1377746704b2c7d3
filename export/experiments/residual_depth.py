"""Plain vs residual networks of growing depth ("Deep Residual Learning", He et al. 2016, sec. 4.2).

The paper's CIFAR finding: adding layers to a plain (BatchNorm, He-init)
network makes its *training* error worse ("degradation"), while the same
networks with identity shortcuts get better with depth. This script trains the
6n+2-layer CIFAR-style networks (export.models.CifarNet), plain and residual,
at two depths with identical data, batches and schedule:

    python -m export.experiments.residual_depth [--depths 20 56] [--width 8] [--data mnist|shapes] [--out docs/experiments]

It records the training loss/error per epoch (the optimization claim) and the
validation accuracy, and plots them in the style of the paper's Figure 6.
The default data is the bundled MNIST sample: within a CPU-minutes budget
(a few thousand images, a few epochs) it separates the four networks clearly,
while on the shapes data both 56-layer nets are still near chance after such
a short run (docs/experiments/README.md has both).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from export.experiments.common import (DEFAULT_OUT, TensorData, batches, load_data, pick_device, pyplot, save_figure,
                                       seeded, write_json)
from export.experiments.seeds import Effect, Spread, effect, seed_range
from export.models import CifarNet, init_weights
from export.progress import progress_bar, stage_line


@dataclass(frozen=True)
class NetRun:
    """One network's training record."""

    name: str
    depth: int
    residual: bool
    params: int
    train_loss: list[float]   # per epoch (mean over the epoch's steps)
    train_error: list[float]  # per epoch
    val_acc: float
    seconds: float


@dataclass(frozen=True)
class ResidualResult:
    data: str
    depths: tuple[int, ...]
    width: int
    res: int
    epochs: int
    lr: float
    runs: dict[str, NetRun]
    seed: int = 0

    def run(self, depth: int, residual: bool) -> NetRun:
        return self.runs[net_name(depth, residual)]

    @property
    def deep_residual_beats_plain(self) -> bool:
        """At the largest depth, shortcuts give a lower final training loss than the plain net."""
        d = max(self.depths)
        return self.run(d, True).train_loss[-1] < self.run(d, False).train_loss[-1]

    @property
    def plain_degrades(self) -> bool:
        """The deepest plain net ends with a higher training loss than the shallowest plain net."""
        return self.run(max(self.depths), False).train_loss[-1] > self.run(min(self.depths), False).train_loss[-1]


def net_name(depth: int, residual: bool) -> str:
    return f"{'resnet' if residual else 'plain'}-{depth}"


def _train(model: nn.Module, train: TensorData, val: TensorData, *, epochs: int, lr: float, batch_size: int,
           seed: int, device: torch.device, progress: bool, desc: str, warmup_epochs: float = 0.3,
           weight_decay: float = 5e-4) -> tuple[list[float], list[float], float]:
    """SGD (momentum 0.9), a short linear warmup then cosine decay, random horizontal flips."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train.y) / batch_size)
    total, warm = epochs * steps_per_epoch, max(1, round(steps_per_epoch * warmup_epochs))

    def factor(it: int) -> float:
        if it < warm:
            return (it + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (it - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator()
    gen.manual_seed(seed)
    criterion = nn.CrossEntropyLoss()
    losses, errors = [], []
    for epoch in range(epochs):
        model.train()
        loss_sum, wrong, n = 0.0, 0, 0
        for idx in progress_bar(batches(len(train.y), batch_size, gen), enabled=progress,
                                desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False):
            x, y = train.x[idx], train.y[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x).to(device)
            y = y.to(device)
            logits = model(x)
            loss = criterion(logits, y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss diverged at epoch {epoch + 1}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            wrong += int((logits.detach().argmax(1) != y).sum())
            n += len(idx)
        losses.append(loss_sum / n)
        errors.append(wrong / n)
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(val.x[i:i + 256].to(device)).argmax(1).cpu() for i in range(0, len(val.y), 256)])
    return losses, errors, float((pred == val.y).float().mean())


def run_residual_experiment(*, data: str = "mnist", depths: Sequence[int] = (20, 56), width: int = 8, res: int = 32,
                            train_samples: int | None = None, epochs: int = 4, lr: float = 0.05, batch_size: int = 32,
                            seed: int = 0, device: str = "cpu", progress: bool = False) -> ResidualResult:
    """Train plain and residual nets at each depth with the same data, init seed, batches and schedule."""
    if len(depths) < 2:
        raise ValueError("need at least two depths to compare")
    dev = pick_device(device)
    train, val = load_data(data, res=res, train_samples=train_samples, seed=seed, progress=progress)
    runs: dict[str, NetRun] = {}
    for depth in sorted(depths):
        for residual in (False, True):
            name = net_name(depth, residual)
            seeded(seed)
            model = CifarNet(depth, train.num_classes, width=width, residual=residual, in_channels=train.x.shape[1])
            init_weights(model, "kaiming")
            model.to(dev)
            start = time.perf_counter()
            losses, errors, acc = _train(model, train, val, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                                         device=dev, progress=progress, desc=name)
            runs[name] = NetRun(name, depth, residual, sum(p.numel() for p in model.parameters()), losses, errors,
                                acc, time.perf_counter() - start)
    return ResidualResult(data, tuple(sorted(depths)), width, train.x.shape[-1], epochs, lr, runs, seed)


def plot(results: Sequence[ResidualResult], path: Path) -> Path:
    """Training error per epoch, plain (left) and residual (right): the mean over seeds, and the range shaded."""
    plt = pyplot()
    first = results[0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, residual in zip(axes, (False, True)):
        for depth in first.depths:
            curves = torch.tensor([r.run(depth, residual).train_error for r in results]) * 100
            epochs = list(range(1, curves.shape[1] + 1))
            acc = Spread.of([r.run(depth, residual).val_acc for r in results])
            line, = ax.plot(epochs, curves.mean(0).tolist(), marker="o", markersize=3,
                            label=f"{net_name(depth, residual)} (val acc {acc.format(3)})")
            if len(results) > 1:
                ax.fill_between(epochs, curves.min(0).values.tolist(), curves.max(0).values.tolist(),
                                color=line.get_color(), alpha=0.2)
        ax.set_title(f"{'residual' if residual else 'plain'} nets on {first.data}, width {first.width}, "
                     f"{first.res}x{first.res}, {len(results)} seeds")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("training error (%), mean and range over seeds")
    fig.tight_layout()
    return save_figure(fig, path)


def summary(result: ResidualResult) -> dict:
    data = asdict(result)
    data["claims"] = {"deep_residual_beats_plain": result.deep_residual_beats_plain,
                      "plain_degrades": result.plain_degrades}
    return data


def effects(results: Sequence[ResidualResult]) -> dict[str, Effect]:
    """The two claims as margins of final training loss per seed (positive: the claim held)."""
    deep, shallow = max(results[0].depths), min(results[0].depths)
    return {
        "deep_residual_beats_plain": effect(
            f"resnet-{deep} ends with a lower training loss than plain-{deep}",
            [r.run(deep, False).train_loss[-1] - r.run(deep, True).train_loss[-1] for r in results]),
        "plain_degrades": effect(
            f"plain-{deep} ends with a higher training loss than plain-{shallow}",
            [r.run(deep, False).train_loss[-1] - r.run(shallow, False).train_loss[-1] for r in results]),
    }


def multi_seed_summary(results: Sequence[ResidualResult]) -> dict:
    """Every seed's runs, the spread of each net's final loss and val accuracy, and each claim's effect."""
    first = results[0]
    names = list(first.runs)
    return {
        "setup": {"data": first.data, "depths": list(first.depths), "width": first.width, "res": first.res,
                  "epochs": first.epochs, "lr": first.lr},
        "seeds": [r.seed for r in results],
        "spread": {name: {"final_train_loss": asdict(Spread.of([r.runs[name].train_loss[-1] for r in results])),
                          "val_acc": asdict(Spread.of([r.runs[name].val_acc for r in results]))}
                   for name in names},
        "effects": {k: e.to_dict() for k, e in effects(results).items()},
        "runs": [summary(r) for r in results],
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.experiments.residual_depth",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("mnist", "shapes"), default="mnist")
    p.add_argument("--depths", type=int, nargs="+", default=[20, 56])
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--res", type=int, default=32, help="shapes only: image side")
    p.add_argument("--train-samples", type=int, default=None, help="random training subset (default: all / 2000 shapes)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=3, help="how many seeds to repeat over (from --seed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the JSON and the plot go")
    return p.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for seed in seed_range(args.seed, args.seeds):
        result = run_residual_experiment(data=args.data, depths=args.depths, width=args.width, res=args.res,
                                         train_samples=args.train_samples, epochs=args.epochs, lr=args.lr, seed=seed,
                                         device=args.device, progress=True)
        results.append(result)
        for run in result.runs.values():
            stage_line(f"seed {seed} {run.name:>10}: train loss {run.train_loss[-1]:.4f}, train error "
                       f"{run.train_error[-1]:.4f}, val acc {run.val_acc:.4f}, {run.params} params, {run.seconds:.1f}s")
    stem = f"residual_depth_{args.data}"
    write_json(args.out / f"{stem}.json", multi_seed_summary(results))
    plot(results, args.out / f"{stem}.png")
    found = effects(results)
    for e in found.values():
        print(e.describe(4))
    print(f"wrote {args.out / stem}.json/.png")
    return 0 if found["deep_residual_beats_plain"].spread.mean > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
