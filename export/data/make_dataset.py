"""``imgserve make-dataset``: write a generated dataset to disk.

``shapes`` (classification) is an ImageFolder, what torchvision's ImageFolder and ``imgserve train`` read::

    OUT/train/<class>/<class>_00000.png
    OUT/val/<class>/<class>_00000.png
    OUT/dataset.json        # generator, seed, classes and counts: how to make it again

``scenes`` (detection and segmentation) is COCO instances JSON plus VOC palette masks::

    OUT/annotations/instances_<split>.json   # COCO: images (with sizes), boxes, areas, RLE masks, categories
    OUT/<split>/images/000000.png
    OUT/<split>/SegmentationClass/000000.png # palette PNG, pixel = class index, 0 = background
    OUT/labels.txt                           # the segmentation classes, background first
    OUT/dataset.json

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

from export.data.coco import uncompressed_rle, xyxy_to_xywh
from export.data.scenes import BACKGROUND, MAX_SCENE_SIZE, MIN_SCENE_SIZE, ScenesConfig, generate_scene
from export.data.shapes import MAX_SIZE, MIN_SIZE, SHAPES, ShapesConfig, generate
from export.data.voc import save_palette_mask
from export.progress import progress_bar

MANIFEST = "dataset.json"
GENERATOR_VERSION = 1  # bump when the drawing code changes what a seed produces
SCENES_GENERATOR_VERSION = 1
SCENE_SPLITS = ("train", "val", "test")
SEGMENTATION_DIR = "SegmentationClass"
LABELS_FILE = "labels.txt"


@dataclass(frozen=True)
class ScenesLayout:
    """Where one split of a scenes-style dataset lives (also the layout ``imgserve train`` and ``eval`` read)."""

    root: Path
    split: str

    @property
    def images(self) -> Path:
        return self.root / self.split / "images"

    @property
    def masks(self) -> Path:
        return self.root / self.split / SEGMENTATION_DIR

    @property
    def annotations(self) -> Path:
        return self.root / "annotations" / f"instances_{self.split}.json"


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


def _scene_job(args: tuple[ScenesConfig, str, int, str, str]) -> dict:
    """Draw one scene, write its image and mask, return its COCO image entry and annotations."""
    config, split, index, image_path, mask_path = args
    scene = generate_scene(config, split, index)
    scene.image.save(image_path, format="PNG", compress_level=1)
    save_palette_mask(scene.classes, Path(mask_path))
    anns = [{"category_id": o.label + 1, "bbox": xyxy_to_xywh(o.box), "area": o.area, "iscrowd": 0,
             "segmentation": uncompressed_rle(o.mask)} for o in scene.objects]
    return {"image": {"id": index, "file_name": Path(image_path).name, "width": scene.image.width,
                      "height": scene.image.height}, "annotations": anns}


def make_scenes(out: Path, *, train: int = 2000, val: int = 200, test: int = 200, size: int = 128, seed: int = 0,
                workers: int = 1, overwrite: bool = False, progress: bool = True) -> DatasetSummary:
    """Generate the scenes dataset under ``out`` (see the module docstring for the layout)."""
    config = ScenesConfig(size=size, seed=seed)
    per_split = {"train": train, "val": val, "test": test}
    if any(n < 0 for n in per_split.values()) or train < 1:
        raise ValueError("need at least one training scene and no negative split sizes")
    out = Path(out)
    existing = [p for p in (*(out / s for s in SCENE_SPLITS), out / "annotations", out / MANIFEST) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds a dataset ({existing[0].name}); pass --overwrite to replace it")
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bar = progress_bar(total=sum(per_split.values()), enabled=progress, desc=f"scenes -> {out}", unit="img")
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(config.class_names)]
    for split, count in per_split.items():
        layout = ScenesLayout(out, split)
        layout.images.mkdir(parents=True)
        layout.masks.mkdir(parents=True)
        jobs = [(config, split, i, str(layout.images / f"{i:06d}.png"), str(layout.masks / f"{i:06d}.png"))
                for i in range(count)]
        results = []
        if workers > 1 and count > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for result in pool.map(_scene_job, jobs, chunksize=16):
                    results.append(result)
                    bar.update()
        else:
            for job in jobs:
                results.append(_scene_job(job))
                bar.update()
        annotations = []
        for result in results:
            for ann in result["annotations"]:
                annotations.append({"id": len(annotations) + 1, "image_id": result["image"]["id"], **ann})
        coco = {"info": {"description": f"imgserve generated scenes, {split} split", "version": str(SCENES_GENERATOR_VERSION)},
                "images": [r["image"] for r in results], "annotations": annotations, "categories": categories}
        layout.annotations.write_text(json.dumps(coco, separators=(",", ":")) + "\n")
    bar.close()
    (out / LABELS_FILE).write_text("\n".join((BACKGROUND, *config.class_names)) + "\n")
    counts = dict(per_split)
    manifest = {"generator": "scenes", "generator_version": SCENES_GENERATOR_VERSION, "size": size, "seed": seed,
                "classes": list(config.class_names), "segmentation_classes": [BACKGROUND, *config.class_names],
                "counts": counts, "side_range": list(config.side_range)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return DatasetSummary(root=out, classes=config.class_names, counts=counts, seconds=time.perf_counter() - start)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="imgserve make-dataset",
                                     description="Generate a learnable image dataset: shapes (an ImageFolder) or scenes (COCO boxes + VOC masks).")
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
    scenes = sub.add_parser("scenes", help="several shapes per image with COCO boxes and VOC palette masks",
                            description="Detection and segmentation scenes: COCO instances JSON and VOC-style "
                                        "palette masks per split (train, val and the held-out test).")
    scenes.add_argument("out", type=Path, nargs="?", default=None, help="output directory")
    scenes.add_argument("--out", dest="out_flag", type=Path, default=None, help="output directory (same as OUT)")
    scenes.add_argument("--train", type=_positive, default=2000, help="training scenes (default 2000)")
    scenes.add_argument("--val", type=_non_negative, default=200, help="validation scenes (default 200)")
    scenes.add_argument("--test", type=_non_negative, default=200, help="held-out test scenes (default 200)")
    scenes.add_argument("--size", type=int, default=128,
                        help=f"nominal image side, {MIN_SCENE_SIZE}-{MAX_SCENE_SIZE}; each side varies 0.75-1.25x (default 128)")
    scenes.add_argument("--seed", type=int, default=0, help="the same seed gives the same images (default 0)")
    scenes.add_argument("--workers", type=_positive, default=1, help="processes drawing images (default 1)")
    scenes.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT")
    scenes.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(list(argv))
    if args.dataset == "scenes":
        if (args.out is None) == (args.out_flag is None):
            parser.error("scenes: give the output directory once, as OUT or --out")
        args.out = args.out or args.out_flag
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.dataset == "scenes":
        return _main_scenes(args)
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


def _main_scenes(args: argparse.Namespace) -> int:
    try:
        summary = make_scenes(args.out, train=args.train, val=args.val, test=args.test, size=args.size,
                              seed=args.seed, workers=args.workers, overwrite=args.overwrite,
                              progress=not args.no_progress)
    except (ValueError, FileExistsError, OSError) as exc:
        print(f"imgserve make-dataset: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{n} {split}" for split, n in summary.counts.items())
    print(f"wrote {counts} scenes of {len(summary.classes)} classes ({', '.join(summary.classes)}) to "
          f"{summary.root} in {summary.seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
