"""``imgserve make-dataset``: write a generated dataset to disk as an ImageFolder.

Layout (what torchvision's ImageFolder and ``imgserve train`` read)::

    OUT/train/<class>/<class>_00000.png
    OUT/val/<class>/<class>_00000.png
    OUT/dataset.json        # generator, seed, classes and counts: how to make it again

Images are deterministic for a seed, so ``make-dataset shapes --seed 0`` gives
the same files on every machine.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

from export.data.shapes import MAX_SIZE, MIN_SIZE, SHAPES, ShapesConfig, generate
from export.progress import progress_bar

MANIFEST = "dataset.json"
GENERATOR_VERSION = 1  # bump when the drawing code changes what a seed produces


@dataclass(frozen=True)
class DatasetSummary:
    """What make_shapes wrote."""

    root: Path
    classes: tuple[str, ...]
    counts: dict[str, int]  # split -> images
    seconds: float


def _job(args: tuple[ShapesConfig, str, int, int, str]) -> None:
    config, split, class_index, index, path = args
    generate(config, split, class_index, index).save(path, format="PNG", compress_level=1)


def _jobs(config: ShapesConfig, out: Path, per_split: dict[str, int]) -> Iterator[tuple[ShapesConfig, str, int, int, str]]:
    for split, count in per_split.items():
        for class_index, name in enumerate(config.class_names):
            for index in range(count):
                yield config, split, class_index, index, str(out / split / name / f"{name}_{index:05d}.png")


def make_shapes(out: Path, *, classes: int = 10, train_per_class: int = 300, val_per_class: int = 100,
                size: int = 64, seed: int = 0, workers: int = 1, overwrite: bool = False,
                progress: bool = True) -> DatasetSummary:
    """Generate the shapes dataset under ``out`` (refusing to mix with an existing dataset unless ``overwrite``)."""
    config = ShapesConfig(classes=classes, size=size, seed=seed)
    if train_per_class < 1 or val_per_class < 1:
        raise ValueError("need at least one train and one val image per class")
    out = Path(out)
    existing = [p for p in (out / "train", out / "val", out / MANIFEST) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a dataset ({existing[0].name}); pass --overwrite to replace it")
    if existing:
        for p in existing:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    per_split = {"train": train_per_class, "val": val_per_class}
    for split in per_split:
        for name in config.class_names:
            (out / split / name).mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    total = len(config.class_names) * sum(per_split.values())
    bar = progress_bar(total=total, enabled=progress, desc=f"shapes -> {out}", unit="img")
    jobs = _jobs(config, out, per_split)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(_job, jobs, chunksize=64):
                bar.update()
    else:
        for job in jobs:
            _job(job)
            bar.update()
    bar.close()
    seconds = time.perf_counter() - start

    counts = {split: n * len(config.class_names) for split, n in per_split.items()}
    manifest = {
        "generator": "shapes",
        "generator_version": GENERATOR_VERSION,
        "config": asdict(config),
        "classes": list(config.class_names),
        "per_class": per_split,
        "counts": counts,
        "side_range": list(config.side_range),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return DatasetSummary(root=out, classes=config.class_names, counts=counts, seconds=seconds)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="imgserve make-dataset",
                                     description="Generate a learnable image dataset as an ImageFolder (train/ and val/).")
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    shapes = sub.add_parser("shapes", help="procedural shapes and textures on cluttered backgrounds",
                            description=f"Classes, in order: {', '.join(SHAPES)}.")
    shapes.add_argument("--out", type=Path, required=True, help="output directory (gets train/, val/, dataset.json)")
    shapes.add_argument("--classes", type=int, default=10, help=f"number of classes, 2-{len(SHAPES)} (default 10)")
    shapes.add_argument("--train-per-class", type=_positive, default=300, help="training images per class (default 300)")
    shapes.add_argument("--val-per-class", type=_positive, default=100, help="validation images per class (default 100)")
    shapes.add_argument("--size", type=int, default=64,
                        help=f"nominal image side in pixels, {MIN_SIZE}-{MAX_SIZE}; each side varies about +-20%% (default 64)")
    shapes.add_argument("--seed", type=int, default=0, help="the same seed gives the same images (default 0)")
    shapes.add_argument("--workers", type=_positive, default=1, help="processes drawing images (default 1)")
    shapes.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    shapes.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        summary = make_shapes(args.out, classes=args.classes, train_per_class=args.train_per_class,
                              val_per_class=args.val_per_class, size=args.size, seed=args.seed,
                              workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, FileExistsError, OSError) as exc:
        print(f"imgserve make-dataset: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {summary.counts['train']} train + {summary.counts['val']} val images of "
          f"{len(summary.classes)} classes ({', '.join(summary.classes)}) to {summary.root} "
          f"in {summary.seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
