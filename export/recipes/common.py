"""What the detection and segmentation recipes share: options, config files, the loop, metrics, export.

A recipe is a ``DenseTask``: how to build its datasets, its loss on a batch, how to score the
model on the validation split (the number that picks the best checkpoint) and which registry models
it trains. The loop is the classifier's, adapted: AdamW with a warmup + cosine schedule per
iteration, best/last checkpoints, metrics.json/.csv/.png, one summary line per epoch (bars on a TTY),
reseeding from (seed, epoch) so epochs are reproducible, and an export through export/dense_export.py.

The network trains through the serving graph's own input step (uint8 NHWC -> normalised NCHW,
export/onnx_export.py's ServingGraph.logits), so training and serving cannot normalise differently.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np
import yaml
import torch
from torch import nn

from export.engine import MetricsLog, load_checkpoint, save_checkpoint, seed_everything
from export.models import ModelEntry, create_model, get_entry, list_models
from export.onnx_export import ServingGraph
from export.precision import autocast, resolve_amp
from export.progress import progress_bar, stage_line
from export.recipes.pretrain import PretrainResult, object_crops, pretrain_encoder
from export.train import (BEST, CONFIG_FILE, LAST, TrainError, _config_layer, _DefaultsHelpFormatter, epoch_seed,
                          lr_factor, pick_device, resolved_config)


DENSE_AMP_MODES = ("off", "bf16", "auto")  # no float16: the dense losses are not loss-scaled


class DenseTask(Protocol):
    """One dense task's recipe (see the module docstring)."""

    name: str               # "detection" or "segmentation"
    default_model: str
    primary_metric: str     # validation metric that picks the best checkpoint (higher is better)

    def add_options(self, parser: argparse.ArgumentParser) -> None: ...

    def datasets(self, args: argparse.Namespace, entry: ModelEntry) -> "Datasets": ...

    def loss(self, model: nn.Module, graph: ServingGraph, batch: Any, device: torch.device
             ) -> tuple[torch.Tensor, dict[str, float]]: ...

    def evaluate(self, model: nn.Module, entry: ModelEntry, data: "Datasets", args: argparse.Namespace
                 ) -> dict[str, Any]: ...

    def objects(self, data: "Datasets") -> Iterable[tuple[Any, np.ndarray, np.ndarray]]:
        """Every training image with its objects' boxes (x1 y1 x2 y2, image pixels) and 0-based object classes,
        for object-crop pretraining (export/recipes/pretrain.py)."""
        ...

    def object_classes(self, data: "Datasets") -> int:
        """How many object classes ``objects`` labels."""
        ...

    def export(self, model: nn.Module, entry: ModelEntry, data: "Datasets", args: argparse.Namespace,
               metrics: dict[str, Any]) -> Any: ...


@dataclass
class Datasets:
    """A recipe's data: the training dataset and collate, the validation dataset, and the model's labels."""

    train: Any
    val: Any
    labels: list[str]
    collate: Callable | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def build_parser(task: DenseTask) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgserve train", formatter_class=_DefaultsHelpFormatter,
        description=f"Train a registered {task.name} model on a COCO/VOC-layout dataset (see docs/training.md).")
    parser.add_argument("-c", "--config", type=Path, default=None,
                        help="YAML file of options (keys are flag names, '-' or '_'); flags override it")
    parser.add_argument("--task", choices=("detection", "segmentation"), default=task.name,
                        help="the recipe (default: the task of --model)")
    g = parser.add_argument_group("data")
    g.add_argument("--data", type=Path, default=None,
                   help="dataset root: annotations/instances_SPLIT.json, SPLIT/images, SPLIT/SegmentationClass")
    g.add_argument("--train-split", default="train", help="split to train on")
    g.add_argument("--val-split", default="val", help="split that picks the best epoch and is reported")
    g.add_argument("--val-every", type=int, default=1,
                   help="validate every N epochs (and always after the last); the best validated epoch is kept")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (0: load in the main process)")
    g.add_argument("--batch-size", type=int, default=8, help="images per training step")
    g.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                   help="keep decoded training images in memory")
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=task.default_model, help=f"registered architecture: {', '.join(list_models())}")
    g.add_argument("--size", type=int, default=None, help="S: the letterboxed input side (default: the registry's)")
    g.add_argument("--init", choices=("kaiming", "lecun"), default="kaiming", help="conv weight init")
    g = parser.add_argument_group("augmentation")
    g.add_argument("--zoom-min", type=float, default=0.75, help="smallest random zoom of the letterboxed image")
    g.add_argument("--zoom-max", type=float, default=1.25, help="largest random zoom (above 1 crops)")
    g.add_argument("--aspect", type=float, default=0.2, help="aspect-ratio jitter: log-ratio drawn from +-this")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    g.add_argument("--colour", type=float, default=0.2, help="brightness/contrast/saturation jitter strength")
    g = parser.add_argument_group("optimizer and schedule")
    g.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    g.add_argument("--lr", type=float, default=4e-3, help="peak AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    g.add_argument("--warmup-epochs", type=float, default=0.3, help="linear warmup length (may be fractional)")
    g.add_argument("--min-lr-ratio", type=float, default=0.01, help="final lr of the cosine as a fraction of --lr")
    g.add_argument("--clip-grad", type=float, default=10.0, help="clip the gradient norm to this")
    g = parser.add_argument_group("object-crop pretraining (export/recipes/pretrain.py)")
    g.add_argument("--pretrain-epochs", type=int, default=0,
                   help="first train the encoder this many epochs to classify windows around the training objects (0: off)")
    g.add_argument("--pretrain-lr", type=float, default=4e-3, help="peak AdamW learning rate of the pretraining")
    g.add_argument("--pretrain-window", type=int, default=None, help="crop window side in input pixels (default: S/2)")
    g = parser.add_argument_group("runtime")
    g.add_argument("--output", type=Path, default=None, help="run directory (default: runs/MODEL)")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --output that holds a run")
    g.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy and torch")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g.add_argument("--amp", choices=DENSE_AMP_MODES, default="off",
                   help="bf16: autocast convolutions to bfloat16 in training (weights, losses and export stay "
                        "float32), ~1.3x faster end to end on CPUs with AMX or AVX512-BF16, slower on others; "
                        "auto: bf16 where the CPU (or GPU) does bfloat16 natively, else off")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="train in NHWC memory layout (oneDNN's native one; ~15%% faster convolutions on CPU)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="report progress: a line per epoch, plus live bars when stderr is a terminal")
    g = parser.add_argument_group("export")
    g.add_argument("--export-to", type=Path, default=None, help="model repository to export the best checkpoint into")
    g.add_argument("--name", default=None, help="model name in the repository (default: --model)")
    g.add_argument("--export-gpu", action="store_true", help="serve the exported model on KIND_GPU Triton instances")
    task.add_options(parser)
    return parser


def parse_args(task: DenseTask, argv: Sequence[str]) -> argparse.Namespace:
    """Defaults < config file < flags, then validated (the classifier's layering)."""
    parser = build_parser(task)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", type=Path, default=None)
    known, _ = pre.parse_known_args(list(argv))
    try:
        if known.config is not None:
            parser.set_defaults(**_config_layer(parser, known.config))
    except TrainError as exc:
        parser.error(str(exc))
    args = parser.parse_args(list(argv))
    args.config = known.config
    try:
        _validate(task, args)
    except TrainError as exc:
        parser.error(str(exc))
    return args


def _validate(task: DenseTask, args: argparse.Namespace) -> None:
    try:
        entry = get_entry(args.model)
    except KeyError as exc:
        raise TrainError(str(exc.args[0])) from None
    if entry.task != task.name:
        raise TrainError(f"--model {args.model} is a {entry.task} model, not {task.name}")
    if args.data is None:
        raise TrainError("give --data DIR (the dataset root; see imgserve make-dataset scenes)")
    for name in ("epochs", "batch_size", "val_every"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or args.weight_decay < 0 or args.workers < 0:
        raise TrainError("need --lr > 0, --weight-decay >= 0 and --workers >= 0")
    if not 0 < args.zoom_min <= args.zoom_max or args.aspect < 0 or not 0 <= args.hflip <= 1 or args.colour < 0:
        raise TrainError("need 0 < --zoom-min <= --zoom-max, --aspect >= 0, 0 <= --hflip <= 1, --colour >= 0")
    if args.pretrain_epochs < 0 or args.pretrain_lr <= 0:
        raise TrainError("need --pretrain-epochs >= 0 and --pretrain-lr > 0")
    if not 0 <= args.warmup_epochs <= args.epochs or not 0 <= args.min_lr_ratio <= 1:
        raise TrainError("need 0 <= --warmup-epochs <= --epochs and 0 <= --min-lr-ratio <= 1")
    args.size = args.size or entry.crop
    args.pretrain_window = args.pretrain_window or args.size // 2
    if not 8 <= args.pretrain_window <= args.size:
        raise TrainError(f"--pretrain-window must be in [8, {args.size}] (the input side)")
    train_crop = getattr(args, "train_crop", None)  # segmentation only
    if train_crop is not None and train_crop > args.size:
        raise TrainError(f"--train-crop {train_crop} is larger than the input side {args.size}")
    if args.output is None:
        args.output = Path("runs") / args.model
    if args.name is None:
        args.name = args.model


@dataclass
class DenseResult:
    """What a run produced: the best epoch's validation metrics, timings, the export."""

    output: Path
    labels: list[str]
    best_epoch: int
    metrics: dict[str, Any]
    train_seconds: float
    export: Any = None
    export_seconds: float | None = None


def _scalar_metrics(metrics: dict[str, Any], prefix: str = "val_") -> dict[str, float]:
    return {f"{prefix}{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def train_epoch(task: DenseTask, model: nn.Module, graph: ServingGraph, loader: Any, optimizer: torch.optim.Optimizer,
                scheduler: Any, device: torch.device, *, clip: float | None, progress: bool, desc: str,
                amp: str = "off") -> dict[str, float]:
    """One pass over ``loader``; returns sample-weighted mean loss (and parts), the final lr and seconds."""
    model.train()
    start, seen = time.perf_counter(), 0
    sums: dict[str, float] = {}
    bar = progress_bar(loader, enabled=progress, desc=desc, leave=False, unit="batch")
    for batch in bar:
        with autocast(device, amp):
            loss, parts = task.loss(model, graph, batch, device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} after {seen} samples; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        scheduler.step()
        n = int(batch[0].shape[0])
        seen += n
        for key, value in {"loss": float(loss.detach()), **parts}.items():
            sums[key] = sums.get(key, 0.0) + value * n
        bar.set_postfix(loss=f"{sums['loss'] / seen:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}")
    bar.close()
    if seen == 0:
        raise ValueError("the training loader yielded no samples")
    return {**{f"train_{k}": v / seen for k, v in sums.items()}, "lr": float(optimizer.param_groups[0]["lr"]),
            "train_seconds": time.perf_counter() - start}


def run(task: DenseTask, args: argparse.Namespace) -> DenseResult:
    """Train, keep the best validation epoch, export it when asked (see the module docstring)."""
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    device = pick_device(args.device)
    args.amp = resolve_amp(args.amp, device, cuda_auto="bf16")   # config.yaml and metrics.json record what this run used
    entry = get_entry(args.model)
    out: Path = args.output
    if (out / LAST).exists() and not args.overwrite:
        raise TrainError(f"{out} already holds a run ({LAST}); pick another --output, or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)
    data = task.datasets(args, entry)
    model = create_model(args.model, len(data.labels), init=args.init).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)  # the graph's NHWC -> NCHW permute already is channels-last
    graph = ServingGraph(model, entry.mean, entry.std, channels=entry.channels, crop=args.size).to(device)
    loader = torch.utils.data.DataLoader(data.train, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, collate_fn=data.collate,
                                         generator=torch.Generator().manual_seed(args.seed),
                                         persistent_workers=args.workers > 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(
        "cosine", epochs=args.epochs, iters_per_epoch=len(loader), warmup_epochs=args.warmup_epochs,
        min_lr_ratio=args.min_lr_ratio))
    config = {**resolved_config(args), "task": task.name}
    (out / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=True))
    (out / "labels.txt").write_text("\n".join(data.labels) + "\n")
    log = MetricsLog(out)
    extra = {"model": args.model, "task": task.name, "labels": data.labels, "size": args.size, "config": config}
    best, best_epoch, best_metrics = -1.0, 0, {}
    run_start = time.perf_counter()
    if args.pretrain_epochs:
        pretrained = pretrain(task, model, entry, data, args, device)
        log.summary.update({"pretrain_epochs": pretrained.epochs, "pretrain_crops": pretrained.crops,
                            "pretrain_crop_accuracy": pretrained.train_accuracy,
                            "pretrain_seconds": pretrained.seconds})
    for epoch in range(1, args.epochs + 1):
        seed_everything(epoch_seed(args.seed, epoch))
        loader.generator.manual_seed(epoch_seed(args.seed, epoch))
        stats = train_epoch(task, model, graph, loader, optimizer, scheduler, device, clip=args.clip_grad,
                            progress=args.progress, desc=f"{args.model} epoch {epoch}/{args.epochs}", amp=args.amp)
        validated = epoch % args.val_every == 0 or epoch == args.epochs
        if validated:
            t0 = time.perf_counter()
            metrics = task.evaluate(model, entry, data, args)
            val_seconds = time.perf_counter() - t0
            score = float(metrics[task.primary_metric])
            if score > best:
                best, best_epoch, best_metrics = score, epoch, metrics
                save_checkpoint(out / BEST, model, optimizer, epoch=epoch, best_accuracy=best,
                                extra={**extra, "best_epoch": epoch})
        save_checkpoint(out / LAST, model, optimizer, epoch=epoch, best_accuracy=best,
                        extra={**extra, "best_epoch": best_epoch})
        log.append(epoch, **stats, **(_scalar_metrics(metrics) | {"val_seconds": val_seconds} if validated else {}))
        log.write(plot=True)
        parts = " ".join(f"{k[6:]} {v:.3f}" for k, v in stats.items() if k.endswith("_loss") and k != "train_loss")
        shown = (f"val {task.primary_metric} {score:.4f}" if validated else f"not validated (--val-every {args.val_every})")
        stage_line(f"{args.model} epoch {epoch}/{args.epochs}: loss {stats['train_loss']:.4f} ({parts}) | "
                   f"{shown} | lr {stats['lr']:.3g} | "
                   f"{stats['train_seconds']:.1f}s" + (f" + val {val_seconds:.1f}s" if validated else ""),
                   enabled=args.progress)
    train_seconds = time.perf_counter() - run_start
    load_checkpoint(out / BEST, model, map_location=device)
    model.to(memory_format=torch.contiguous_format).eval()
    log.summary.update({"model": args.model, "task": task.name, "labels": data.labels, "size": args.size,
                        "epochs": args.epochs, "best_epoch": best_epoch, "train_seconds": train_seconds,
                        "train_samples": len(data.train), "val_samples": len(data.val), "device": str(device),
                        "amp": args.amp,
                        "checkpoint": str(out / BEST), **{f"val_{k}": v for k, v in best_metrics.items()}})
    log.write(plot=True)
    result = DenseResult(output=out, labels=data.labels, best_epoch=best_epoch, metrics=best_metrics,
                         train_seconds=train_seconds)
    if args.export_to is not None:
        exported = task.export(model.float().cpu(), entry, data, args, best_metrics)
        result.export, result.export_seconds = exported, exported.seconds
        log.summary.update({"export_path": str(exported.path), "export_seconds": exported.seconds,
                            "export_parity": exported.parity.to_dict()})
        log.write(plot=False)
    return result


def pretrain(task: DenseTask, model: nn.Module, entry: ModelEntry, data: Datasets, args: argparse.Namespace,
             device: torch.device) -> PretrainResult:
    """Object-crop pretraining of ``model.encoder`` on the training split (export/recipes/pretrain.py)."""
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, nn.Module) or not hasattr(encoder, "widths"):
        raise TrainError(f"--pretrain-epochs needs a model with an encoder (.encoder.widths); {args.model} has none")
    crops = object_crops(task.objects(data), args.size, args.pretrain_window)
    return pretrain_encoder(encoder, crops, num_classes=task.object_classes(data), mean=entry.mean, std=entry.std,
                            epochs=args.pretrain_epochs, lr=args.pretrain_lr, seed=args.seed, device=device,
                            progress=args.progress, label=f"{args.model} pretrain",
                            precision=lambda: autocast(device, args.amp))


def main(task: DenseTask, argv: Sequence[str] | None = None) -> int:
    args = parse_args(task, sys.argv[1:] if argv is None else argv)
    try:
        result = run(task, args)
    except (TrainError, FileNotFoundError, FileExistsError, ValueError, FloatingPointError) as exc:
        print(f"imgserve train: {exc}", file=sys.stderr)
        return 2
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if isinstance(v, float))
    print(f"{args.model}: best epoch {result.best_epoch}: {shown} on the {args.val_split} split; "
          f"{result.train_seconds:.1f}s training; run in {result.output}")
    if result.export is not None:
        print(f"exported to {result.export.path} ({result.export_seconds:.1f}s)")
    return 0


def letterboxed_sample(images: Sequence[Any], size: int, count: int = 8) -> np.ndarray:
    """uint8 [count, S, S, 3] serving inputs of the first ``count`` PIL images (for export checks)."""
    from serving.preprocess import letterbox

    return np.stack([letterbox(img, size)[0] for img in images[:count]])
