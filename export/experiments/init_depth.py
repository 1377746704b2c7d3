"""He init vs Var[w] = 1/n on a 30-layer plain ReLU network ("Delving Deep into Rectifiers", He et al. 2015).

A ReLU zeroes half of its input, so a layer with Var[w] = 1/n_in halves the
variance of the signal it passes on; after L layers it is 2^-L of the input's,
in both directions, and a 30-layer net gets almost no gradient. He init,
Var[w] = 2/n_in, keeps it constant. This script measures both at init (std of
every layer's pre-activations on real images) and then trains both with the
same SGD settings on real images (the bundled MNIST sample by default, or the
shapes data):

    python -m export.experiments.init_depth [--arch mlp|conv] [--depth 30] [--data mnist|shapes] [--out docs/experiments]

The network is a plain stack (no BatchNorm, no shortcuts), since either would
hide the effect: ``mlp`` is 29 hidden Linear+ReLU layers and a linear
classifier over the flattened image, ``conv`` 29 3x3 conv+ReLU layers, global
average pooling and a linear classifier. A plain net this deep is touchy even
with the right init, so the learning rate is small (0.005, momentum 0.9).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from export.experiments.common import (DEFAULT_OUT, TensorData, batches, chance_loss, load_data, pick_device, pyplot,
                                       save_figure, seeded, write_json)
from export.experiments.seeds import Effect, Spread, effect, seed_range
from export.models import init_weights
from export.progress import progress_bar, stage_line

SCHEMES = ("kaiming", "lecun")
SCHEME_LABEL = {"kaiming": "He: Var[w] = 2/n", "lecun": "Var[w] = 1/n"}


class PlainNet(nn.Module):
    """``depth`` weight layers with ReLU between them; keeps the weight layers for per-layer statistics."""

    def __init__(self, arch: str, depth: int, width: int, in_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth}")
        c, h, w = in_shape
        layers: list[nn.Module] = []
        if arch == "mlp":
            dims = [c * h * w] + [width] * (depth - 1)
            layers = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])]
            self.head: nn.Module = nn.Flatten()
        elif arch == "conv":
            chans = [c] + [width] * (depth - 1)
            layers = [nn.Conv2d(a, b, 3, padding=1) for a, b in zip(chans[:-1], chans[1:])]
            self.head = nn.Identity()
        else:
            raise ValueError(f"arch must be mlp or conv, got {arch!r}")
        self.arch = arch
        self.hidden = nn.ModuleList(layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor, record: list[float] | None = None) -> torch.Tensor:
        x = self.head(x)
        for layer in self.hidden:
            x = layer(x)
            if record is not None:
                record.append(float(x.detach().std()))
            x = torch.relu(x)
        if self.arch == "conv":
            x = x.mean(dim=(2, 3))
        x = self.classifier(x)
        if record is not None:
            record.append(float(x.detach().std()))
        return x


@dataclass(frozen=True)
class SchemeRun:
    """One init scheme: per-layer pre-activation std at init, and how training went."""

    scheme: str
    layer_std: list[float]       # std of each weight layer's output at init (last = logits)
    epoch_loss: list[float]      # mean training loss per epoch
    iter_loss: list[float]       # training loss of every step
    val_acc: float
    seconds: float


@dataclass(frozen=True)
class InitResult:
    data: str
    arch: str
    depth: int
    width: int
    res: int
    epochs: int
    lr: float
    chance_loss: float
    runs: dict[str, SchemeRun]
    seed: int = 0

    @property
    def he_learns(self) -> bool:
        """He init got the training loss clearly below chance (10% lower)."""
        return self.runs["kaiming"].epoch_loss[-1] < 0.9 * self.chance_loss

    @property
    def small_init_stalls(self) -> bool:
        """Var = 1/n stayed at chance (within 2%): it did not learn."""
        return min(self.runs["lecun"].epoch_loss) > 0.98 * self.chance_loss

    @property
    def std_decay(self) -> dict[str, float]:
        """last hidden layer's std / first layer's std at init, per scheme."""
        return {s: r.layer_std[-2] / r.layer_std[0] for s, r in self.runs.items()}


def _train(model: nn.Module, train: TensorData, val: TensorData, *, epochs: int, lr: float, batch_size: int,
           seed: int, device: torch.device, progress: bool, desc: str) -> tuple[list[float], list[float], float]:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator()
    gen.manual_seed(seed)
    criterion = nn.CrossEntropyLoss()
    epoch_loss, iter_loss = [], []
    for epoch in range(epochs):
        model.train()
        total, n = 0.0, 0
        for idx in progress_bar(batches(len(train.y), batch_size, gen), enabled=progress,
                                desc=f"{desc} epoch {epoch + 1}", leave=False):
            x, y = train.x[idx].to(device), train.y[idx].to(device)
            loss = criterion(model(x), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss diverged at epoch {epoch + 1}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = loss.item()
            iter_loss.append(value)
            total += value * len(idx)
            n += len(idx)
        epoch_loss.append(total / n)
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(val.x[i:i + 512].to(device)).argmax(1).cpu() for i in range(0, len(val.y), 512)])
    return epoch_loss, iter_loss, float((pred == val.y).float().mean())


def run_init_experiment(*, data: str = "mnist", arch: str = "mlp", depth: int = 30, width: int = 256, res: int = 16,
                        train_samples: int | None = None, epochs: int = 4, lr: float = 0.005, batch_size: int = 64,
                        seed: int = 0, device: str = "cpu", progress: bool = False) -> InitResult:
    """Measure and train both init schemes on identical data, batches and optimizer settings."""
    dev = pick_device(device)
    train, val = load_data(data, res=res, train_samples=train_samples, seed=seed, progress=progress)
    runs: dict[str, SchemeRun] = {}
    for scheme in SCHEMES:
        seeded(seed)
        model = PlainNet(arch, depth, width, tuple(train.x.shape[1:]), train.num_classes)  # type: ignore[arg-type]
        init_weights(model, scheme)
        model.to(dev)
        layer_std: list[float] = []
        with torch.no_grad():
            model(train.x[:256].to(dev), record=layer_std)
        start = time.perf_counter()
        epoch_loss, iter_loss, acc = _train(model, train, val, epochs=epochs, lr=lr, batch_size=batch_size,
                                            seed=seed, device=dev, progress=progress, desc=scheme)
        runs[scheme] = SchemeRun(scheme, layer_std, epoch_loss, iter_loss, acc, time.perf_counter() - start)
    return InitResult(data, arch, depth, width, train.x.shape[-1], epochs, lr, chance_loss(train.num_classes), runs,
                      seed)


def plot(results: Sequence[InitResult], path: Path) -> Path:
    """Per-layer std at init and the training loss, one thin line per seed."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {"kaiming": "tab:blue", "lecun": "tab:orange"}
    for n, result in enumerate(results):
        for scheme, run in result.runs.items():
            label = f"{SCHEME_LABEL[scheme]} ({len(results)} seeds)" if n == 0 else None
            layers = range(1, len(run.layer_std) + 1)
            ax1.semilogy(layers, run.layer_std, marker="o", markersize=2, color=colours[scheme], alpha=0.6,
                         label=label)
            steps = torch.tensor(run.iter_loss)
            k = max(1, len(steps) // 100)
            smooth = steps[: len(steps) // k * k].view(-1, k).mean(1) if k > 1 else steps
            ax2.plot([(i + 0.5) * k for i in range(len(smooth))], smooth.tolist(), color=colours[scheme], alpha=0.6,
                     label=label)
    first = results[0]
    ax1.set_xlabel("layer")
    ax1.set_ylabel("std of pre-activations at init")
    ax1.set_title(f"{first.depth}-layer plain ReLU {first.arch} on {first.data}: signal at init")
    ax2.axhline(first.chance_loss, color="grey", linestyle=":", label="chance (ln K)")
    ax2.set_xlabel("training step")
    ax2.set_ylabel("training loss")
    ax2.set_title(f"training (SGD, lr {first.lr}, momentum 0.9)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def summary(result: InitResult) -> dict:
    data = asdict(result)
    for run in data["runs"].values():
        run.pop("iter_loss")
    data["claims"] = {"he_learns": result.he_learns, "small_init_stalls": result.small_init_stalls,
                      "std_last_over_first": result.std_decay}
    return data


def effects(results: Sequence[InitResult]) -> dict[str, Effect]:
    """Each claim as a margin per seed (positive: it held)."""
    return {
        "he_below_chance": effect("He init's final loss below chance",
                                  [r.chance_loss - r.runs["kaiming"].epoch_loss[-1] for r in results]),
        "he_beats_one_over_n": effect("He init's final loss below 1/n init's",
                                      [r.runs["lecun"].epoch_loss[-1] - r.runs["kaiming"].epoch_loss[-1]
                                       for r in results]),
        "he_val_acc_gain": effect("He init's val accuracy above 1/n init's",
                                  [r.runs["kaiming"].val_acc - r.runs["lecun"].val_acc for r in results]),
    }


def multi_seed_summary(results: Sequence[InitResult]) -> dict:
    """The JSON an experiment writes: every seed's run, the spread of each number, and each claim's effect."""
    first = results[0]
    return {
        "setup": {"data": first.data, "arch": first.arch, "depth": first.depth, "width": first.width,
                  "res": first.res, "epochs": first.epochs, "lr": first.lr, "chance_loss": first.chance_loss},
        "seeds": [r.seed for r in results],
        "spread": {scheme: {"final_loss": asdict(Spread.of([r.runs[scheme].epoch_loss[-1] for r in results])),
                            "val_acc": asdict(Spread.of([r.runs[scheme].val_acc for r in results])),
                            "std_last_over_first": asdict(Spread.of([r.std_decay[scheme] for r in results]))}
                   for scheme in SCHEMES},
        "effects": {k: e.to_dict() for k, e in effects(results).items()},
        "runs": [summary(r) for r in results],
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.experiments.init_depth", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("mnist", "shapes"), default="mnist")
    p.add_argument("--arch", choices=("mlp", "conv"), default="mlp")
    p.add_argument("--depth", type=int, default=30)
    p.add_argument("--width", type=int, default=None, help="default: 256 (mlp), 16 (conv)")
    p.add_argument("--res", type=int, default=16, help="shapes only: image side")
    p.add_argument("--train-samples", type=int, default=None, help="random training subset (default: all)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.005)
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
    width = args.width or (256 if args.arch == "mlp" else 16)
    results = []
    for seed in seed_range(args.seed, args.seeds):
        result = run_init_experiment(data=args.data, arch=args.arch, depth=args.depth, width=width, res=args.res,
                                     train_samples=args.train_samples, epochs=args.epochs, lr=args.lr, seed=seed,
                                     device=args.device, progress=True)
        results.append(result)
        for scheme, run in result.runs.items():
            stage_line(f"seed {seed} {SCHEME_LABEL[scheme]:>18}: std last/first at init "
                       f"{result.std_decay[scheme]:.3g}, train loss {run.epoch_loss[0]:.3f} -> "
                       f"{run.epoch_loss[-1]:.3f} (chance {result.chance_loss:.3f}), val acc {run.val_acc:.3f}, "
                       f"{run.seconds:.1f}s")
    stem = f"init_depth_{args.arch}_{args.data}"
    write_json(args.out / f"{stem}.json", multi_seed_summary(results))
    plot(results, args.out / f"{stem}.png")
    found = effects(results)
    for e in found.values():
        print(e.describe())
    print(f"wrote {args.out / stem}.json/.png")
    return 0 if all(e.spread.mean > 0 for e in found.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
