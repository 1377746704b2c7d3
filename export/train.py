"""``imgserve train``: train a registered classifier on an ImageFolder, the AlexNet/ResNet recipe.

Detectors and segmenters have sibling recipes (export/recipes/); ``main`` hands them the command
line when ``--task``, the config's ``task`` or the task of ``--model`` says so.

    imgserve train --model resnet18 --data DIR --resize 72 --crop 64 --epochs 6 --output runs/r18
    imgserve train --config configs/resnet18_shapes.yaml --lr 0.05        # flags override the config
    imgserve train --resume runs/r18/last.pt --epochs 8                   # continue where it stopped

The recipe: resize S + random C x C crops + horizontal flips + PCA colour
jitter (export/data/augment.py); He init (``--init lecun`` for Var = 1/n);
BatchNorm where the architecture has it (torchvision's AlexNet keeps its two
p=0.5 dropout layers in the classifier); SGD with momentum and weight decay;
a step or cosine learning-rate schedule with optional linear warmup, applied
per iteration. Mixed precision (``--amp``, export/precision.py: float16 on CUDA, bfloat16 on CPUs
that compute it natively) and channels-last are on by default on CUDA and on request on a CPU.

Each run directory gets ``config.yaml`` (the fully resolved options: rerun
with ``--config DIR/config.yaml``), ``last.pt`` and ``best.pt`` (best
validation accuracy), ``labels.txt`` and metrics.json/.csv/.png. After the
last epoch the best checkpoint is evaluated with the centre crop and with
10-crop averaging; both numbers land in metrics.json's summary.
``--export-to REPO`` then exports that checkpoint into a model repository.

Randomness is reseeded at every epoch from (seed, epoch), so a resumed run
draws the same batches and augmentations an uninterrupted one would have.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml
from torch import nn

from export.data.augment import (PCA_ALPHA_STD, RGBPCA, eval_transform, rgb_pca_of_images, ten_crop_transform,
                                 train_transform)
from export.data.imagefolder import (DatasetError, check_same_classes, image_folder, image_paths, make_loader,
                                     resolve_splits)
from export.engine import (MetricsLog, load_checkpoint, save_checkpoint, seed_everything, stats_dict,
                           train_one_epoch, validate)
from export.models import ModelEntry, create_model, get_entry, list_models
from export.precision import AMP_MODES, resolve_amp
from export.progress import progress_bar
from export.recipes import TASKS as RECIPE_TASKS

CONFIG_FILE = "config.yaml"
LAST = "last.pt"
BEST = "best.pt"
LABELS = "labels.txt"
SCHEDULES = ("cosine", "step", "constant")
INITS = ("kaiming", "lecun")
# Options that say where a run is, not what it is: never written to config.yaml.
_NOT_SAVED = {"config", "resume", "overwrite", "export_to", "name", "progress", "export_gpu", "stop_after", "task"}
# Tasks with their own recipe (export/recipes/), reached through main().
DENSE_TASKS = RECIPE_TASKS


class TrainError(RuntimeError):
    """A run cannot start or continue (bad options, existing output, mismatched checkpoint)."""


# ------------------------------------------------------------------ options

class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" only where the help names no default itself and X is not None."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgserve train", description="Train a registered classifier on an ImageFolder (train/ and val/).",
        formatter_class=_DefaultsHelpFormatter)
    parser.add_argument("-c", "--config", type=Path, default=None,
                        help="YAML file of options (keys are flag names, '-' or '_'); flags override it")
    parser.add_argument("--task", choices=("classification", *DENSE_TASKS), default="classification",
                        help="the recipe: detection and segmentation have their own options "
                             "(imgserve train --task detection --help); default: the task of --model")

    g = parser.add_argument_group("data")
    g.add_argument("--data", type=Path, default=None, help="directory holding train/ and val/ (one folder per class)")
    g.add_argument("--train-dir", type=Path, default=None, help="training ImageFolder (instead of DATA/train)")
    g.add_argument("--val-dir", type=Path, default=None, help="validation ImageFolder (instead of DATA/val)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (0: load in the main process)")
    g.add_argument("--batch-size", type=int, default=64, help="images per training step")
    g.add_argument("--eval-batch-size", type=int, default=None, help="default: --batch-size")

    g = parser.add_argument_group("model")
    g.add_argument("--model", default="resnet18", help=f"registered architecture: {', '.join(list_models())}")
    g.add_argument("--num-classes", type=int, default=None, help="default: the number of class folders")
    g.add_argument("--init", choices=INITS, default="kaiming",
                   help="kaiming: Var[w] = 2/n_in (He et al.); lecun: Var[w] = 1/n_in")
    g.add_argument("--resize", type=int, default=None, help="S: shorter side resized to this (default: the registry's)")
    g.add_argument("--crop", type=int, default=None, help="C: C x C crops fed to the network (default: the registry's)")

    g = parser.add_argument_group("augmentation")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--pca-std", type=float, default=PCA_ALPHA_STD,
                   help="std of AlexNet's PCA colour jitter alphas (0 turns it off; RGB models only)")
    g.add_argument("--pca-images", type=int, default=1000, help="training images sampled for the RGB covariance")

    g = parser.add_argument_group("optimizer and schedule")
    g.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    g.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="L2 penalty on every parameter")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=False, help="Nesterov momentum")
    g.add_argument("--sched", choices=SCHEDULES, default="cosine", help="learning-rate schedule")
    g.add_argument("--warmup-epochs", type=float, default=0.0, help="linear warmup length (may be fractional)")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine: final lr as a fraction of --lr")
    g.add_argument("--step-size", type=int, default=30, help="step: epochs between lr drops")
    g.add_argument("--gamma", type=float, default=0.1, help="step: lr multiplier at each drop")
    g.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this")

    g = parser.add_argument_group("runtime")
    g.add_argument("--output", type=Path, default=None, help="run directory (default: runs/MODEL)")
    g.add_argument("--resume", type=Path, default=None,
                   help="checkpoint to continue from (its run's config.yaml supplies the defaults)")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --output that holds a run")
    g.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="stop after this epoch of the --epochs schedule (for time-boxed jobs; continue with --resume)")
    g.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy and torch")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--no-amp", dest="amp", action="store_const", const="off", help="the same as --amp off")
    g.add_argument("--amp", nargs="?", const="auto", choices=AMP_MODES, default=None,
                   help="mixed precision: fp16 (CUDA, with loss scaling), bf16 (bfloat16 autocast; on CPUs with AMX "
                        "or AVX512-BF16 about 1.4-2.4x faster steps), auto (fp16 on CUDA, bf16 on a CPU that has it "
                        "natively, else off), off. Default: fp16 on CUDA, off on CPU; --amp alone means auto")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last (NHWC) memory format (default: on for CUDA, off on CPU, where it helps "
                        "oneDNN's convolutions, most with bf16)")
    g.add_argument("--deterministic", action="store_true", help="deterministic cuDNN kernels (slower)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--ten-crop-eval", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate the best checkpoint with 10-crop averaging as well as the centre crop")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="report progress: a line per epoch, plus live bars when stderr is a terminal")

    g = parser.add_argument_group("export")
    g.add_argument("--export-to", type=Path, default=None, help="model repository to export the best checkpoint into")
    g.add_argument("--name", default=None, help="model name in the repository (default: --model)")
    g.add_argument("--ten-crop-default", action=argparse.BooleanOptionalAction, default=None,
                   help="whether the served model uses 10-crop when a request does not say (default: the registry's)")
    g.add_argument("--export-gpu", action="store_true", help="serve the exported model on KIND_GPU Triton instances")
    return parser


def _config_layer(parser: argparse.ArgumentParser, path: Path) -> dict[str, Any]:
    """Read a YAML config into parser defaults, checking every key names a flag and every value its type."""
    if not path.is_file():
        raise TrainError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TrainError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise TrainError(f"config file {path} must hold a mapping of option: value")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in actions:
            raise TrainError(f"{path}: unknown option {raw_key!r} (see imgserve train --help)")
        action = actions[key]
        if value is None:
            out[key] = None
        elif isinstance(value, bool) and action.choices is not None and {"auto", "off"} <= set(action.choices):
            out[key] = "auto" if value else "off"  # amp: true / amp: off (YAML reads "off" as false)
        elif isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
            if not isinstance(value, bool):
                raise TrainError(f"{path}: {raw_key} must be true or false, not {value!r}")
            out[key] = value
        else:
            if isinstance(value, (dict, list)):
                raise TrainError(f"{path}: {raw_key} must be a single value, not {value!r}")
            try:
                converted = action.type(str(value)) if action.type is not None else str(value)
            except (TypeError, ValueError):
                raise TrainError(f"{path}: {raw_key}={value!r} is not a valid {getattr(action.type, '__name__', 'value')}") from None
            if action.choices is not None and converted not in action.choices:
                raise TrainError(f"{path}: {raw_key} must be one of {list(action.choices)}, not {value!r}")
            out[key] = converted
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Defaults < config file (``--config``, or the resumed run's config.yaml) < flags; then validated."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", type=Path, default=None)
    pre.add_argument("--resume", type=Path, default=None)
    known, _ = pre.parse_known_args(argv)
    config_path = known.config
    if config_path is None and known.resume is not None:
        resumed = known.resume.parent / CONFIG_FILE
        config_path = resumed if resumed.is_file() else None
    try:
        if config_path is not None:
            parser.set_defaults(**_config_layer(parser, config_path))
    except TrainError as exc:
        parser.error(str(exc))
    args = parser.parse_args(argv)
    args.config = config_path
    try:
        _validate(args)
    except TrainError as exc:
        parser.error(str(exc))
    return args


def _validate(args: argparse.Namespace) -> None:
    if args.task != "classification":
        raise TrainError(f"--task {args.task} has its own recipe: run it through imgserve train (export.train.main)")
    try:
        entry = get_entry(args.model)
    except KeyError as exc:
        raise TrainError(str(exc.args[0])) from None
    if args.data is None and (args.train_dir is None or args.val_dir is None):
        raise TrainError("give --data DIR (with train/ and val/) or both --train-dir and --val-dir")
    positive = {"epochs": args.epochs, "batch_size": args.batch_size, "pca_images": args.pca_images,
                "step_size": args.step_size}
    for name, value in positive.items():
        if value < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.stop_after is not None and not 1 <= args.stop_after <= args.epochs:
        raise TrainError(f"--stop-after must be in [1, --epochs], got {args.stop_after}")
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        raise TrainError(f"--eval-batch-size must be >= 1, got {args.eval_batch_size}")
    if args.workers < 0:
        raise TrainError(f"--workers must be >= 0, got {args.workers}")
    if args.lr <= 0 or not math.isfinite(args.lr):
        raise TrainError(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.momentum < 1 or args.weight_decay < 0:
        raise TrainError("need 0 <= --momentum < 1 and --weight-decay >= 0")
    if not 0 <= args.hflip <= 1 or args.pca_std < 0:
        raise TrainError("need 0 <= --hflip <= 1 and --pca-std >= 0")
    if args.warmup_epochs < 0 or args.warmup_epochs > args.epochs:
        raise TrainError(f"--warmup-epochs must be in [0, --epochs], got {args.warmup_epochs}")
    if not 0 <= args.min_lr_ratio <= 1 or args.gamma <= 0:
        raise TrainError("need 0 <= --min-lr-ratio <= 1 and --gamma > 0")
    if args.num_classes is not None and args.num_classes < 2:
        raise TrainError(f"--num-classes must be >= 2, got {args.num_classes}")
    # Sizes: a crop alone keeps the registry's resize:crop ratio (as the exporter does).
    if args.crop is None:
        args.crop = entry.crop if args.resize is None else min(entry.crop, args.resize)
    if args.resize is None:
        args.resize = max(args.crop, round(args.crop * entry.resize / entry.crop))
    if args.crop < 1 or args.resize < args.crop:
        raise TrainError(f"need 1 <= --crop <= --resize, got resize={args.resize} crop={args.crop}")
    if entry.pad_to is not None and args.crop > entry.pad_to:
        raise TrainError(f"{entry.name} takes at most {entry.pad_to}x{entry.pad_to} input, got --crop {args.crop}")
    if args.output is None:
        args.output = args.resume.parent if args.resume is not None else Path("runs") / args.model
    if args.name is None:
        args.name = args.model


def resolved_config(args: argparse.Namespace) -> dict[str, Any]:
    """The options that define a run, as plain YAML values (what config.yaml holds)."""
    out: dict[str, Any] = {}
    for key, value in sorted(vars(args).items()):
        if key in _NOT_SAVED:
            continue
        out[key.replace("_", "-")] = str(value) if isinstance(value, Path) else value
    return out


# ------------------------------------------------------------------ pieces

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise TrainError(f"--device must be auto, cpu or cuda[:N], got {name!r}")
    return device


def lr_factor(sched: str, *, epochs: int, iters_per_epoch: int, warmup_epochs: float = 0.0,
              step_size: int = 30, gamma: float = 0.1, min_lr_ratio: float = 0.0) -> Any:
    """The per-iteration learning-rate multiplier (for LambdaLR).

    A closure, so LambdaLR's state holds only the iteration count: a resumed
    run follows the schedule of its current options.
    """
    total = max(1, epochs * iters_per_epoch)
    warm = int(round(warmup_epochs * iters_per_epoch))

    def factor(it: int) -> float:
        if it < warm:
            return (it + 1) / warm
        if sched == "cosine":
            t = min(1.0, (it - warm) / max(1, total - warm))
            return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
        if sched == "step":
            return gamma ** ((it // iters_per_epoch) // step_size)
        return 1.0

    return factor


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed seed for one epoch's shuffling and augmentation."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


@dataclass(frozen=True)
class CropEval:
    """Centre-crop and 10-crop accuracy (and mean NLL of the softmax) of one model on the val split."""

    center_acc: float
    center_nll: float
    ten_crop_acc: float | None
    ten_crop_nll: float | None
    samples: int
    seconds: float
    center_per_class: list[float] = field(default_factory=list)
    ten_crop_per_class: list[float] | None = None


@torch.no_grad()
def evaluate_crops(model: nn.Module, val_dir: Path, *, resize: int, crop: int, entry: ModelEntry,
                   device: torch.device, batch_size: int = 64, ten_crop: bool = True, channels_last: bool = False,
                   workers: int = 0, progress: bool = False) -> CropEval:
    """Centre crop vs 10-crop (average of the ten crops' softmax) on ``val_dir``, as the gateway computes them."""
    start = time.perf_counter()
    model.eval()
    pad = _pad_step(entry, crop)

    def run(transform: Any, per_image: int) -> tuple[float, float, int, list[float]]:
        ds = image_folder(val_dir, transform, entry.channels)
        loader = make_loader(ds, batch_size=max(1, batch_size // per_image), shuffle=False, workers=workers)
        correct, nll, n = 0, 0.0, 0
        class_hits = torch.zeros(len(ds.classes))
        class_count = torch.zeros(len(ds.classes))
        bar = progress_bar(loader, enabled=progress, desc=f"eval {per_image}-crop", leave=False, unit="batch")
        for images, targets in bar:
            b = images.shape[0]
            x = images.reshape(b * per_image, *images.shape[-3:])
            if pad is not None:
                x = pad(x)
            x = x.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            probs = torch.softmax(model(x).float(), dim=1).reshape(b, per_image, -1).mean(dim=1).cpu()
            hits = probs.argmax(dim=1) == targets
            correct += int(hits.sum())
            class_hits.index_add_(0, targets, hits.float())
            class_count.index_add_(0, targets, torch.ones(b))
            nll += float(-torch.log(probs[torch.arange(b), targets].clamp_min(1e-12)).sum())
            n += b
        per_class = (class_hits / class_count.clamp_min(1)).tolist()
        return correct / n, nll / n, n, per_class

    acc, nll, n, per_class = run(eval_transform(resize, crop, entry.mean, entry.std), 1)
    acc10 = nll10 = per_class10 = None
    if ten_crop:
        acc10, nll10, _, per_class10 = run(ten_crop_transform(resize, crop, entry.mean, entry.std), 10)
    return CropEval(acc, nll, acc10, nll10, n, time.perf_counter() - start, per_class, per_class10)


class _PadTensor:
    """Zero-pad normalized-later [..., C, H, W] tensors to the network's size (LeNet's 28 -> 32)."""

    def __init__(self, crop: int, pad_to: int, mean: Sequence[float], std: Sequence[float]) -> None:
        margin = pad_to - crop
        self.before, self.after = margin // 2, margin - margin // 2
        # Images are already normalized here: black (0) becomes -mean/std per channel.
        self.fill = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape[-3:]
        out = self.fill.view(c, 1, 1).expand(*x.shape[:-2], h + self.before + self.after,
                                             w + self.before + self.after).clone()
        out[..., self.before:self.before + h, self.before:self.before + w] = x
        return out


def _pad_step(entry: ModelEntry, crop: int) -> _PadTensor | None:
    if entry.pad_to is None or entry.pad_to == crop:
        return None
    return _PadTensor(crop, entry.pad_to, entry.mean, entry.std)


class _Padded:
    """A transform followed by the registry's zero padding (a class, so workers can pickle it)."""

    def __init__(self, transform: Any, pad: _PadTensor) -> None:
        self.transform, self.pad = transform, pad

    def __call__(self, img: Any) -> torch.Tensor:
        return self.pad(self.transform(img))


# ------------------------------------------------------------------ the run

@dataclass
class TrainResult:
    """What a run produced and how well it did."""

    output: Path
    classes: list[str]
    epochs_run: int
    best_epoch: int
    best_val_acc: float
    final: CropEval | None
    train_seconds: float
    export_path: Path | None = None
    export_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _check_output(args: argparse.Namespace) -> None:
    out: Path = args.output
    if args.resume is None and (out / LAST).exists() and not args.overwrite:
        raise TrainError(f"{out} already holds a run ({LAST}); continue it with --resume {out / LAST}, "
                         f"pick another --output, or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)


def _write_config(args: argparse.Namespace, extra: dict[str, Any]) -> Path:
    path = Path(args.output) / CONFIG_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump({**resolved_config(args), **extra}, sort_keys=True))
    os.replace(tmp, path)
    return path


def train(args: argparse.Namespace) -> TrainResult:
    """Run the whole recipe described in the module docstring."""
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    device = pick_device(args.device)
    on_cuda = device.type == "cuda"
    amp = resolve_amp(args.amp or ("fp16" if on_cuda else "off"), device)
    channels_last = on_cuda if args.channels_last is None else bool(args.channels_last)
    if amp == "fp16" and not on_cuda:
        warnings.warn("--amp fp16 needs CUDA; training in float32 on the CPU (--amp bf16 or auto there)",
                      stacklevel=2)
        amp = "off"
    entry = get_entry(args.model)
    _check_output(args)
    seed_everything(args.seed, deterministic=args.deterministic)

    # Data: the class folders define the labels; both splits must agree.
    splits = resolve_splits(args.data, args.train_dir, args.val_dir)
    train_ds = image_folder(splits.train, None, entry.channels)
    val_ds = image_folder(splits.val, eval_transform(args.resize, args.crop, entry.mean, entry.std), entry.channels)
    classes = check_same_classes(train_ds, val_ds)
    if args.num_classes is None:
        args.num_classes = len(classes)
    elif args.num_classes != len(classes):
        raise TrainError(f"--num-classes {args.num_classes} but the data has {len(classes)} classes: {classes}")

    checkpoint_state = None
    if args.resume is not None:
        checkpoint_state = torch.load(args.resume, map_location="cpu", weights_only=True) if args.resume.is_file() else None
        if checkpoint_state is None:
            raise TrainError(f"--resume {args.resume}: no such checkpoint")
        saved = checkpoint_state.get("extra", {})
        if saved.get("model") not in (None, args.model) or saved.get("classes") not in (None, classes):
            raise TrainError(f"--resume {args.resume}: checkpoint is a {saved.get('model')} over classes "
                             f"{saved.get('classes')}, this run a {args.model} over {classes}")

    pca: RGBPCA | None = None
    if entry.channels == 3 and args.pca_std > 0:
        if checkpoint_state is not None and checkpoint_state.get("extra", {}).get("pca"):
            pca = RGBPCA.from_dict(checkpoint_state["extra"]["pca"])
        else:
            pca = rgb_pca_of_images(image_paths(train_ds), max_images=args.pca_images, seed=args.seed)
    train_tf = train_transform(args.resize, args.crop, entry.mean, entry.std, pca=pca, pca_std=args.pca_std,
                               flip_p=args.hflip)
    pad = _pad_step(entry, args.crop)
    if pad is not None:
        train_tf, val_ds.transform = _Padded(train_tf, pad), _Padded(val_ds.transform, pad)
    train_ds.transform = train_tf
    train_loader = make_loader(train_ds, batch_size=args.batch_size, shuffle=True, workers=args.workers,
                               seed=args.seed, drop_last=len(train_ds) > args.batch_size, pin_memory=on_cuda)
    val_loader = make_loader(val_ds, batch_size=args.eval_batch_size or args.batch_size, shuffle=False,
                             workers=args.workers, pin_memory=on_cuda)

    model = create_model(args.model, args.num_classes, init=args.init).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, nesterov=args.nesterov and args.momentum > 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(
        args.sched, epochs=args.epochs, iters_per_epoch=len(train_loader), warmup_epochs=args.warmup_epochs,
        step_size=args.step_size, gamma=args.gamma, min_lr_ratio=args.min_lr_ratio))
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    criterion = nn.CrossEntropyLoss()

    out: Path = args.output
    log = MetricsLog(out)
    start_epoch, best_acc, best_epoch = 1, -1.0, 0
    if args.resume is not None:
        state = load_checkpoint(args.resume, model, optimizer, scheduler=scheduler, scaler=scaler,
                                map_location=device)
        start_epoch, best_acc = state.next_epoch, state.best_accuracy
        best_epoch = int(state.extra.get("best_epoch", 0))
        log = MetricsLog.load(out)
        log.rows = [r for r in log.rows if r["epoch"] < start_epoch]
        if start_epoch > args.epochs:
            raise TrainError(f"--resume {args.resume}: it finished epoch {state.epoch} of {args.epochs}; "
                             f"pass a larger --epochs to train on")
    extra = {"model": args.model, "classes": classes, "resize": args.resize, "crop": args.crop,
             "pca": pca.to_dict() if pca is not None else None, "config": resolved_config(args)}
    _write_config(args, {})
    (out / LABELS).write_text("\n".join(classes) + "\n")

    run_start = time.perf_counter()
    last_epoch = args.epochs if args.stop_after is None else args.stop_after
    if start_epoch > last_epoch:
        raise TrainError(f"--stop-after {last_epoch}: the run already finished epoch {start_epoch - 1}")
    for epoch in range(start_epoch, last_epoch + 1):
        # Everything random in this epoch depends on (seed, epoch) only: resumes repeat it exactly.
        seed_everything(epoch_seed(args.seed, epoch), deterministic=args.deterministic)
        train_loader.generator.manual_seed(epoch_seed(args.seed, epoch))
        stats = train_one_epoch(model, train_loader, optimizer, criterion, device, scheduler=scheduler,
                                scaler=scaler, amp=amp, channels_last=channels_last, progress=args.progress,
                                desc=f"{args.model} epoch {epoch}/{args.epochs}", max_grad_norm=args.clip_grad)
        val = validate(model, val_loader, criterion, device, channels_last=channels_last)
        if val.accuracy > best_acc:
            best_acc, best_epoch = val.accuracy, epoch
            save_checkpoint(out / BEST, model, optimizer, epoch=epoch, best_accuracy=best_acc, scheduler=scheduler,
                            scaler=scaler, extra={**extra, "best_epoch": best_epoch})
        save_checkpoint(out / LAST, model, optimizer, epoch=epoch, best_accuracy=best_acc, scheduler=scheduler,
                        scaler=scaler, extra={**extra, "best_epoch": best_epoch})
        log.append(epoch, **stats_dict("train", stats), **stats_dict("val", val))
        log.write(plot=True)
        if args.progress:
            print(f"{args.name} epoch {epoch}/{args.epochs}: train loss {stats.loss:.4f} acc {stats.accuracy:.4f} | "
                  f"val loss {val.loss:.4f} acc {val.accuracy:.4f} | lr {stats.lr:.4g} | {stats.seconds:.1f}s",
                  file=sys.stderr)
    train_seconds = time.perf_counter() - run_start

    # The final numbers are the best checkpoint's, with the centre crop and with 10-crop averaging.
    load_checkpoint(out / BEST, model, map_location=device)
    final = evaluate_crops(model, splits.val, resize=args.resize, crop=args.crop, entry=entry, device=device,
                           batch_size=args.eval_batch_size or args.batch_size, ten_crop=args.ten_crop_eval,
                           channels_last=channels_last, workers=args.workers, progress=args.progress)
    previous = float(log.summary.get("train_seconds", 0.0)) if args.resume is not None else 0.0
    log.summary.update({
        "model": args.model, "classes": classes, "num_classes": len(classes), "resize": args.resize,
        "crop": args.crop, "epochs": args.epochs, "best_epoch": best_epoch, "best_val_acc": best_acc,
        "center_crop_acc": final.center_acc, "center_crop_nll": final.center_nll,
        "ten_crop_acc": final.ten_crop_acc, "ten_crop_nll": final.ten_crop_nll, "val_samples": final.samples,
        "train_samples": len(train_ds), "train_seconds": previous + train_seconds, "device": str(device),
        "amp": amp, "channels_last": channels_last, "checkpoint": str(out / BEST),
    })
    log.write(plot=True)
    log.summary["epochs_done"] = last_epoch
    log.write(plot=False)
    result = TrainResult(output=out, classes=classes, epochs_run=last_epoch - start_epoch + 1,
                         best_epoch=best_epoch, best_val_acc=best_acc, final=final,
                         train_seconds=previous + train_seconds)

    if args.export_to is not None:
        from export.onnx_export import export_to_repository

        exported = export_to_repository(model.float().to(memory_format=torch.contiguous_format).cpu(), entry,
                                        args.export_to, args.name, classes, resize=args.resize, crop=args.crop,
                                        ten_crop_default=args.ten_crop_default, gpu=args.export_gpu,
                                        description=f"{args.model} trained on {splits.train.parent.name or splits.train} "
                                                    f"(val acc {final.center_acc:.4f})")
        result.export_path, result.export_seconds = exported.path, exported.seconds
        log.summary.update({"export_path": str(exported.path), "export_seconds": exported.seconds,
                            "export_parity_max_abs_diff": exported.parity_max_abs_diff})
        log.write(plot=False)
    return result


def task_of(argv: Sequence[str]) -> str:
    """The recipe a command line asks for: --task, else the config file's ``task``, else the task of --model
    (flag, then config), else classification. Unreadable configs fall through to the classifier's errors."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", type=Path, default=None)
    pre.add_argument("--task", default=None)
    pre.add_argument("--model", default=None)
    known, _ = pre.parse_known_args(list(argv))
    config: dict[str, Any] = {}
    if known.config is not None and known.config.is_file():
        try:
            loaded = yaml.safe_load(known.config.read_text())
            config = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:
            config = {}
    task = known.task or config.get("task")
    if task is None:
        model = known.model or config.get("model")
        try:
            task = get_entry(str(model)).task if model is not None else "classification"
        except KeyError:
            task = "classification"
    return str(task)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    task = task_of(argv)
    if task in DENSE_TASKS:
        from export.recipes import common, load_task

        return common.main(load_task(task), argv)
    args = parse_args(argv)
    try:
        result = train(args)
    except (TrainError, DatasetError, FileNotFoundError, FileExistsError, ValueError, FloatingPointError) as exc:
        print(f"imgserve train: {exc}", file=sys.stderr)
        return 2
    final = result.final
    assert final is not None
    line = (f"{args.model}: best val acc {result.best_val_acc:.4f} (epoch {result.best_epoch}); "
            f"centre crop {final.center_acc:.4f}")
    if final.ten_crop_acc is not None:
        line += f", 10-crop {final.ten_crop_acc:.4f}"
    line += f" on {final.samples} images; {result.train_seconds:.1f}s training; run in {result.output}"
    print(line)
    if result.export_path is not None:
        print(f"exported to {result.export_path} ({result.export_seconds:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
