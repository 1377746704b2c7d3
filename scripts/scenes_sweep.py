"""Train the scenes detector and segmenter under several seeds and report held-out quality with its spread.

    python scripts/scenes_sweep.py --recipes default --seeds 0 1 2 3 4      # what build-repo trains (calibrates tests)
    python scripts/scenes_sweep.py --recipes full --seeds 0 1 2              # the 3-minute recipes (configs/*_full.yaml)
    python scripts/scenes_sweep.py --recipes long --seeds 0 1 2              # the same, trained longer (configs/*_long.yaml)
    python scripts/scenes_sweep.py --recipes crops --models unet_scenes --seeds 0 1 2 3  # U-Net on 96 px windows
    python scripts/scenes_sweep.py --recipes full --models centernet_scenes --epochs 14 --out runs/sweep14  # more epochs
    python scripts/scenes_sweep.py --recipes default full --seeds 0 1 2      # both on the same data per seed
    python scripts/scenes_sweep.py --recipes full --keep-all runs/sweep_repos  # then: scripts/tta_gain.py on them

For each seed: generate a scenes dataset with that seed (build-repo's sizes, plus 200 held-out test
scenes; kept in OUT/data for the next recipe), train each recipe with ``--seed`` set to it, export into a scratch repository (parity and batch
invariance checked), and score the export on the test split with ``imgserve eval``'s code (onnxruntime,
the gateway's letterbox, pycocotools / mIoU). Prints a markdown table (mean, sample std, min, max) and
writes every number to OUT/results.json. One training at a time, on the threads you give it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.build_repo import SCENE_RECIPES, SCENES_DATA  # noqa: E402
from export.data.make_dataset import ScenesLayout, make_scenes  # noqa: E402
from export.evaluation.cli import evaluate_detector, evaluate_segmenter  # noqa: E402
from export.evaluation.predictors import repository_predictor  # noqa: E402
from export.recipes import common, load_task  # noqa: E402
from export.train import task_of  # noqa: E402

TEST_SCENES = 200


def recipe_config(name: str, which: str) -> Path:
    """The config file of a recipe: the default build's (equal to build-repo's options; tested), or
    configs/NAME_full.yaml / NAME_long.yaml / NAME_crops.yaml."""
    return ROOT / "configs" / (SCENE_RECIPES[name].config_file if which == "default" else f"{name}_{which}.yaml")


def run_one(name: str, which: str, seed: int, data: Path, work: Path, threads: int | None,
            epochs: int | None = None) -> dict:
    config = recipe_config(name, which)
    argv = ["--config", str(config), "--seed", str(seed), "--data", str(data), "--output", str(work / "runs" / name),
            "--overwrite", "--export-to", str(work / "repo"), "--name", name, "--no-progress"]
    if epochs is not None:  # the flag beats the config file
        argv += ["--epochs", str(epochs)]
    if threads:
        argv += ["--threads", str(threads)]
    task = load_task(task_of(["--config", str(config)]))
    args = common.parse_args(task, argv)
    result = common.run(task, args)
    spec, predictor = repository_predictor(work / "repo" / name, threads=threads or 1)
    test = ScenesLayout(data, "test")
    if spec.task == "detection":
        scores = evaluate_detector(predictor, test.annotations, test.images, spec.labels).to_dict()  # type: ignore[arg-type]
    else:
        scores = evaluate_segmenter(predictor, test.images, test.masks, spec.labels).to_dict()  # type: ignore[arg-type]
    return {"model": name, "recipe": which, "seed": seed, "train_seconds": result.train_seconds,
            "epochs": args.epochs, "val": {k: v for k, v in result.metrics.items() if isinstance(v, float)},
            "test": scores, "parity": result.export.parity.to_dict()}


def summarise(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f} (min {min(values):.4f}, max {max(values):.4f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", choices=("default", "full", "long", "crops"), nargs="+", default=["full"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None,
                        help="override the recipes' epochs (after pretraining); use a fresh --out for each value")
    parser.add_argument("--models", nargs="+", default=sorted(SCENE_RECIPES))
    parser.add_argument("--threads", type=int, default=None, help="torch/onnxruntime threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "scenes_sweep")
    parser.add_argument("--keep-all", type=Path, default=None,
                        help="copy every (recipe, seed) repository to DIR/RECIPE/seedN (e.g. for scripts/tta_gain.py)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="copy the first seed's repository and runs of the first recipe here (DIR/model_repository, DIR/runs: the "
                             "layout IMGSERVE_TEST_DEFAULT_REPOSITORY=DIR/model_repository expects)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    paths = {which: args.out / f"results_{which}.json" for which in args.recipes}
    results = {which: json.loads(p.read_text()) if p.is_file() else [] for which, p in paths.items()}
    data_root = args.out / "data"
    for which in args.recipes:  # every seed of one recipe before the next: the cheaper recipe finishes first
        for seed in args.seeds:
            data = data_root / f"seed{seed}"
            if not (data / "dataset.json").is_file():
                start = time.perf_counter()
                make_scenes(data, train=SCENES_DATA["train"], val=SCENES_DATA["val"], test=TEST_SCENES,
                            size=SCENES_DATA["size"], seed=seed, workers=2, progress=False, overwrite=True)
                print(f"seed {seed}: data in {time.perf_counter() - start:.0f}s", flush=True)
            with tempfile.TemporaryDirectory(prefix="scenes-sweep-") as tmp:
                work = Path(tmp)
                for name in args.models:
                    config = recipe_config(name, which)
                    if not config.is_file():
                        print(f"seed {seed} {which} {name}: no {config.name}, skipped", flush=True)
                        continue
                    row = run_one(name, which, seed, data, work, args.threads, args.epochs)
                    results[which] = [r for r in results[which] if (r["model"], r["seed"]) != (name, seed)] + [row]
                    paths[which].write_text(json.dumps(results[which], indent=2) + "\n")
                    shown = {k: round(v, 4) for k, v in row["test"].items() if isinstance(v, float)}
                    print(f"seed {seed} {which} {name}: test {shown}, train {row['train_seconds']:.0f}s", flush=True)
                if args.keep_all is not None:
                    import shutil

                    shutil.copytree(work / "repo", args.keep_all / which / f"seed{seed}", dirs_exist_ok=True)
                if args.keep is not None and seed == args.seeds[0] and which == args.recipes[0]:
                    import shutil

                    shutil.copytree(work / "repo", args.keep / "model_repository", dirs_exist_ok=True)
                    shutil.copytree(work / "runs", args.keep / "runs", dirs_exist_ok=True)
    for which in args.recipes:
        print(f"\n{which} recipes, held-out test split ({TEST_SCENES} scenes per seed)\n")
        print("| model | metric | mean ± std (min, max) | seeds |\n| --- | --- | --- | --- |")
        for name in args.models:
            rows = [r for r in results[which] if r["model"] == name and r["seed"] in args.seeds]
            if not rows:
                continue
            metrics = ("map", "map50", "map75") if "map" in rows[0]["test"] else ("miou", "miou_foreground")
            for metric in (*metrics, "train_seconds"):
                values = [r["test"][metric] if metric in r["test"] else r[metric] for r in rows]
                print(f"| {name} | {metric} | {summarise(values)} | {len(rows)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
