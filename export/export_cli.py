"""``imgserve export``: put a registered architecture with chosen weights into a model repository.

    imgserve export resnet50 --weights IMAGENET1K_V2 --model-repository model_repository      # torchvision weights
    imgserve export resnet18 --weights resnet18.pth --name resnet18 --model-repository repo   # a state_dict file
    imgserve export cifar_resnet20 --weights runs/resnet20/best.pt --name shapes              # an imgserve checkpoint
    imgserve export resnet18 --num-classes 10 --resize 72 --crop 64                          # random (a loud warning)

The export goes through export.onnx_export: uint8 NHWC in, softmax out,
normalization inside the graph, checked against PyTorch before it is written
as a new version. Labels: the ImageNet categories for torchvision weights,
the checkpoint's class names for imgserve checkpoints, or ``--labels FILE``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from export.models import get_entry, list_models
from export.weights import (LoadedWeights, WeightsError, load_enum_weights, load_file_weights, looks_like_file,
                            random_weights)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="imgserve export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("model", help=f"registered architecture: {', '.join(list_models())}")
    p.add_argument("--weights", default=None,
                   help="a state_dict / checkpoint FILE, or a torchvision weight name (IMAGENET1K_V1, DEFAULT, ...); "
                        "without it the weights are random")
    p.add_argument("--name", default=None, help="model name in the repository (default: MODEL)")
    p.add_argument("--model-repository", type=Path, default=None,
                   help="repository directory (env IMGSERVE_MODEL_REPOSITORY; default model_repository)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="class count for random weights (default 1000 for torchvision models, else 10); "
                        "checked against a weights file")
    p.add_argument("--labels", type=Path, default=None, help="file with one class name per line, in class order")
    p.add_argument("--resize", type=int, default=None, help="S (default: what the weights were made for, else the registry's)")
    p.add_argument("--crop", type=int, default=None, help="C (default: what the weights were made for, else the registry's)")
    p.add_argument("--ten-crop-default", action=argparse.BooleanOptionalAction, default=None,
                   help="use 10-crop when a request does not say (default: the registry's)")
    p.add_argument("--gpu", action="store_true", help="serve on KIND_GPU Triton instances")
    p.add_argument("--fp16", action="store_true",
                   help="FP16 weights with uint8/FP32 I/O, checked against FP32 (top-1 agreement, probability "
                        "tolerance); halves the file, for GPUs")
    p.add_argument("--tensorrt", action="store_true",
                   help="with --gpu: Triton runs the model with its TensorRT accelerator at FP16 precision")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--no-download", action="store_true",
                   help="use torchvision weights only from the torch hub cache, never the network")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights")
    p.add_argument("--description", default="")
    return p.parse_args(list(argv))


def _read_labels(path: Path | None) -> tuple[str, ...] | None:
    if path is None:
        return None
    if not path.is_file():
        raise WeightsError(f"labels file {path} does not exist")
    labels = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if len(labels) < 2:
        raise WeightsError(f"labels file {path} needs at least two class names, one per line")
    return labels


def load(args: argparse.Namespace) -> LoadedWeights:
    """The model and labels the options ask for."""
    entry = get_entry(args.model)
    labels = _read_labels(args.labels)
    spec = args.weights
    if spec is None:
        num_classes = args.num_classes or (len(labels) if labels else (1000 if entry.torchvision_name else 10))
        return random_weights(entry, num_classes, seed=args.seed, labels=labels)
    if looks_like_file(spec):
        return load_file_weights(entry, Path(spec), num_classes=args.num_classes, labels=labels)
    loaded = load_enum_weights(entry, spec, download=not args.no_download)
    if args.num_classes not in (None, len(loaded.labels)):
        raise WeightsError(f"--num-classes {args.num_classes}: {spec} weights have {len(loaded.labels)} classes")
    if labels is not None:
        raise WeightsError("--labels does not apply to torchvision weights (their class names come with them)")
    return loaded


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        entry = get_entry(args.model)
    except KeyError as exc:
        print(f"imgserve export: {exc.args[0]}", file=sys.stderr)
        return 2
    if args.model_repository is None:
        from serving.settings import Settings

        args.model_repository = Settings.from_env().model_repository
    start = time.perf_counter()
    if args.tensorrt and not args.gpu:
        print("imgserve export: --tensorrt needs --gpu (TensorRT runs only on GPU instances)", file=sys.stderr)
        return 2
    try:
        loaded = load(args)
    except WeightsError as exc:
        print(f"imgserve export: {exc}", file=sys.stderr)
        return 2
    if loaded.random:
        bar = "!" * 78
        print(f"{bar}\nWARNING: no --weights given: exporting {args.model} with RANDOM weights ({loaded.source}).\n"
              f"Its predictions are meaningless; use it only to test plumbing or measure speed.\n"
              f"Real weights: --weights IMAGENET1K_V1 (torchvision) or --weights FILE.\n{bar}", file=sys.stderr)
    resize = args.resize if args.resize is not None else (loaded.resize if args.crop is None else None)
    crop = args.crop if args.crop is not None else loaded.crop
    name = args.name or args.model
    from export.onnx_export import ExportError, export_to_repository
    from serving.repository import RepositoryError

    try:
        result = export_to_repository(loaded.model, entry, args.model_repository, name, loaded.labels, gpu=args.gpu,
                                      ten_crop_default=args.ten_crop_default, resize=resize, crop=crop,
                                      max_batch_size=args.max_batch_size, fp16=args.fp16, tensorrt=args.tensorrt,
                                      description=args.description or f"{args.model}, {loaded.source}")
    except (ExportError, RepositoryError, ValueError, OSError) as exc:
        print(f"imgserve export: {exc}", file=sys.stderr)
        return 2
    pre = result.spec.preprocess
    print(f"exported {args.model} ({loaded.source}) as {name} v{result.version} -> {result.path}\n"
          f"  {len(loaded.labels)} classes, resize {pre.resize}, crop {pre.crop}, 10-crop default "
          f"{str(pre.ten_crop_default).lower()}, ONNX parity max |diff| {result.parity_max_abs_diff:.1e}, "
          f"{time.perf_counter() - start:.1f}s\n"
          + (f"  FP16 weights: top-1 agreement {result.fp16.top1_agreement:.3f}, max |p16 - p32| "
             f"{result.fp16.max_abs_prob_diff:.1e} on {result.fp16.images} images\n" if result.fp16 else "")
          + ("  Triton accelerator: TensorRT, FP16\n" if args.tensorrt else "") +
          f"  a running gateway serves it after a restart (it reads the repository when it starts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
