"""Centre crop vs 10-crop test-time averaging (AlexNet, Krizhevsky et al. 2012, sec. 4.1).

AlexNet trains on random C x C crops of S x S images and, at test time,
averages the softmax of ten crops: the four corners and the centre, and their
mirror images. Every training crop position is then covered by a test crop
near it, and averaging smooths out crop-specific mistakes. This script trains
a model on the shapes data with ``imgserve train`` (or evaluates an existing
run) and measures both on the held-out val split, the way the gateway serves
them (resize S, centre S x S, then the crops):

    python -m export.experiments.ten_crop [--model cifar_resnet20 --resize 36 --crop 32 --epochs 4] [--out docs/experiments]
    python -m export.experiments.ten_crop --run runs/resnet20      # evaluate a finished run's best.pt
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import yaml

from export.data.make_dataset import make_shapes
from export.engine import load_checkpoint
from export.experiments.common import DEFAULT_OUT, pyplot, save_figure, write_json
from export.experiments.seeds import Effect, Spread, effect, seed_range
from export.models import create_model, get_entry
from export.progress import stage_line
from export.train import BEST, CONFIG_FILE, CropEval, evaluate_crops, parse_args as train_args, train


@dataclass(frozen=True)
class TenCropResult:
    model: str
    resize: int
    crop: int
    classes: list[str]
    eval: CropEval
    train_seconds: float | None
    seed: int | None = None

    @property
    def ten_crop_at_least_as_accurate(self) -> bool:
        assert self.eval.ten_crop_acc is not None
        return self.eval.ten_crop_acc >= self.eval.center_acc


def evaluate_run(run_dir: Path, *, val_dir: Path | None = None, device: str = "cpu",
                 progress: bool = False) -> TenCropResult:
    """Centre vs 10-crop accuracy of a finished ``imgserve train`` run (its best.pt and config.yaml)."""
    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    model_name, resize, crop = config["model"], int(config["resize"]), int(config["crop"])
    if val_dir is None:
        val_dir = Path(config["val-dir"]) if config.get("val-dir") else Path(config["data"]) / "val"
    entry = get_entry(model_name)
    model = create_model(model_name, int(config["num-classes"]), init=None)
    state = load_checkpoint(run_dir / BEST, model)
    result = evaluate_crops(model, val_dir, resize=resize, crop=crop, entry=entry, device=torch.device(device),
                            ten_crop=True, progress=progress)
    return TenCropResult(model_name, resize, crop, list(state.extra.get("classes", [])), result, None)


def run_ten_crop_experiment(work_dir: Path, *, model: str = "cifar_resnet20", resize: int = 36, crop: int = 32,
                            epochs: int = 4, train_per_class: int = 300, val_per_class: int = 100, size: int = 64,
                            lr: float = 0.05, batch_size: int = 32, seed: int = 0, device: str = "cpu",
                            threads: int | None = None, data: Path | None = None,
                            progress: bool = False) -> TenCropResult:
    """Generate shapes (unless ``data`` is given), train with ``imgserve train``, compare the two evaluations."""
    work_dir = Path(work_dir).resolve()
    if data is not None:
        data = Path(data).resolve()  # the run's config.yaml must name it wherever it is read from
    else:
        data = work_dir / "shapes"
        make_shapes(data, train_per_class=train_per_class, val_per_class=val_per_class, size=size, seed=seed,
                    overwrite=True, progress=progress)
    argv = ["--data", str(data), "--model", model, "--resize", str(resize), "--crop", str(crop),
            "--epochs", str(epochs), "--lr", str(lr), "--batch-size", str(batch_size), "--seed", str(seed),
            "--device", device, "--output", str(work_dir / "run"), "--overwrite", "--warmup-epochs", "0.3",
            "--progress" if progress else "--no-progress"]
    if threads:
        argv += ["--threads", str(threads)]
    result = train(train_args(argv))
    assert result.final is not None
    return TenCropResult(model, resize, crop, result.classes, result.final, result.train_seconds, seed)


def plot(results: Sequence[TenCropResult], path: Path) -> Path:
    """Per-class accuracy, centre crop vs 10-crop: the mean over seeds, with the range as error bars."""
    plt = pyplot()
    first = results[0]
    names = first.classes or [str(i) for i in range(len(first.eval.center_per_class))]
    fig, ax = plt.subplots(figsize=(11, 4))
    xs = range(len(names))
    low = 100.0
    for offset, label, per_class, overall in (
            (-0.2, "centre crop", [r.eval.center_per_class for r in results], [r.eval.center_acc for r in results]),
            (0.2, "10-crop", [r.eval.ten_crop_per_class or [] for r in results],
             [r.eval.ten_crop_acc or 0.0 for r in results])):
        values = torch.tensor(per_class) * 100
        mean = values.mean(0)
        low = min(low, float(values.min()))
        err = [(mean - values.min(0).values).tolist(), (values.max(0).values - mean).tolist()]
        ax.bar([x + offset for x in xs], mean.tolist(), width=0.4, yerr=err if len(results) > 1 else None,
               capsize=3, label=f"{label} ({Spread.of(overall).format(2, 100)}%)")
    ax.set_xticks(list(xs), names, rotation=30)
    ax.set_ylim(max(0.0, low - 10), 100.5)
    ax.set_ylabel("val accuracy (%), mean and range")
    ax.set_title(f"{first.model} on shapes (resize {first.resize}, crop {first.crop}), {first.eval.samples} val images, "
                 f"{len(results)} seed(s)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


def summary(result: TenCropResult) -> dict:
    data = asdict(result)
    data["claims"] = {"ten_crop_at_least_as_accurate": result.ten_crop_at_least_as_accurate}
    return data


def effects(results: Sequence[TenCropResult]) -> dict[str, Effect]:
    """10-crop against the centre crop, per seed: accuracy gained and NLL saved (positive: 10-crop better)."""
    return {
        "accuracy_gain": effect("10-crop accuracy above the centre crop's",
                                [(r.eval.ten_crop_acc or 0.0) - r.eval.center_acc for r in results]),
        "nll_reduction": effect("10-crop NLL below the centre crop's",
                                [r.eval.center_nll - (r.eval.ten_crop_nll or 0.0) for r in results]),
    }


def multi_seed_summary(results: Sequence[TenCropResult]) -> dict:
    first = results[0]
    return {
        "setup": {"model": first.model, "resize": first.resize, "crop": first.crop, "samples": first.eval.samples},
        "seeds": [r.seed for r in results],
        "spread": {"center_acc": asdict(Spread.of([r.eval.center_acc for r in results])),
                   "ten_crop_acc": asdict(Spread.of([r.eval.ten_crop_acc or 0.0 for r in results])),
                   "center_nll": asdict(Spread.of([r.eval.center_nll for r in results])),
                   "ten_crop_nll": asdict(Spread.of([r.eval.ten_crop_nll or 0.0 for r in results]))},
        "effects": {k: e.to_dict() for k, e in effects(results).items()},
        "runs": [summary(r) for r in results],
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export.experiments.ten_crop", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=None, help="evaluate this finished train run instead of training")
    p.add_argument("--data", type=Path, default=None,
                   help="existing shapes ImageFolder shared by every seed (default: generate one per seed)")
    p.add_argument("--model", default="cifar_resnet20")
    p.add_argument("--resize", type=int, default=36)
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--val-per-class", type=int, default=100)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=3, help="how many seeds to repeat over (from --seed)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work-dir", type=Path, default=None, help="where data and the runs go (default: a temp dir)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the JSON and the plot go")
    return p.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results: list[TenCropResult] = []
    if args.run is not None:
        results.append(evaluate_run(args.run, device=args.device, progress=True))
    else:
        with tempfile.TemporaryDirectory(prefix="imgserve-tencrop-") as tmp:
            for seed in seed_range(args.seed, args.seeds):
                work = (args.work_dir or Path(tmp)) / f"seed{seed}"
                results.append(run_ten_crop_experiment(
                    work, model=args.model, resize=args.resize, crop=args.crop, epochs=args.epochs,
                    train_per_class=args.train_per_class, val_per_class=args.val_per_class, size=args.size,
                    lr=args.lr, batch_size=args.batch_size, seed=seed, device=args.device, threads=args.threads,
                    data=args.data, progress=True))
                ev = results[-1].eval
                stage_line(f"seed {seed}: centre crop {ev.center_acc:.4f} (NLL {ev.center_nll:.4f}), "
                           f"10-crop {ev.ten_crop_acc:.4f} (NLL {ev.ten_crop_nll:.4f})")
    write_json(args.out / "ten_crop.json", multi_seed_summary(results))
    plot(results, args.out / "ten_crop.png")
    found = effects(results)
    for e in found.values():
        print(e.describe(4))
    print(f"{results[0].model} (S={results[0].resize}, C={results[0].crop}), {results[0].eval.samples} val images, "
          f"{len(results)} seed(s); {time.perf_counter() - start:.0f}s; wrote {args.out / 'ten_crop'}.json/.png")
    return 0 if found["accuracy_gain"].spread.mean >= 0 else 1


if __name__ == "__main__":
    sys.exit(main())
