"""``imgserve train --task detection|segmentation`` end to end at toy size: dispatch, config files, metrics,
export through the repository, ``imgserve eval`` on the export; the shipped configs equal the default build."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from export.build_repo import SCENE_RECIPES
from export.data.make_dataset import make_scenes
from export.evaluation.cli import main as eval_main
from export.recipes import common, load_task
from export.train import main, task_of
from serving.repository import read_model

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--epochs", "2", "--batch-size", "8", "--threads", "1", "--no-progress", "--val-split", "test"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy_scenes") / "scenes"
    make_scenes(root, train=24, val=0, test=10, seed=2, progress=False)
    return root


@pytest.mark.parametrize("task, model, metric, speed", [
    ("detection", "centernet_tiny", "map", []),
    ("segmentation", "unet_tiny", "miou", []),
    # bf16 autocast in NHWC: the checkpoint, the export and its parity stay float32
    ("detection", "centernet_tiny", "map", ["--amp", "bf16", "--channels-last"]),
    ("segmentation", "unet_tiny", "miou", ["--amp", "bf16", "--channels-last"]),
    # training on 64 px windows of the 128 px scenes; validation and the export stay at 128
    ("segmentation", "unet_tiny", "miou", ["--amp", "bf16", "--channels-last", "--train-crop", "64"])])
def test_toy_run_trains_exports_and_evaluates(scenes: Path, tmp_path: Path, task: str, model: str, metric: str,
                                              speed: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "toy.yaml"
    # the task comes from the model; one epoch of object-crop pretraining runs first
    config.write_text(yaml.safe_dump({"model": model, "lr": 0.003, "epochs": 5, "pretrain-epochs": 1}))
    out, repo = tmp_path / "run", tmp_path / "repo"
    assert main(["--config", str(config), "--data", str(scenes), *TOY, *speed, "--output", str(out),
                 "--export-to", str(repo), "--name", "toy"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["summary"]["amp"] == ("bf16" if speed else "off")
    assert [r["epoch"] for r in metrics["epochs"]] == [1, 2]  # the flag beat the file
    assert all(f"val_{metric}" in r and "train_loss" in r for r in metrics["epochs"])
    assert metrics["summary"]["task"] == task and metrics["summary"]["export_path"]
    assert metrics["summary"]["pretrain_epochs"] == 1 and metrics["summary"]["pretrain_crops"] > 24  # several per scene
    assert 0 < metrics["summary"]["pretrain_seconds"] < metrics["summary"]["train_seconds"]  # counted as training
    with Image.open(out / "metrics.png") as png:
        assert png.format == "PNG"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["task"] == task and saved["model"] == model and saved["lr"] == 0.003
    spec = read_model(repo / "toy").spec
    assert spec.task == task and spec.preprocess.geometry == "letterbox"
    capsys.readouterr()
    report = tmp_path / "eval.json"
    assert eval_main(["--model-repository", str(repo), "--model", "toy", "--data", str(scenes), "--split", "test",
                      "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    scores = json.loads(report.read_text())
    assert scores["task"] == task and scores["images"] == 10
    assert ("mAP@0.5" in printed) if task == "detection" else ("mIoU" in printed)
    # The eval of the exported ONNX file, through the gateway's letterbox, is what training's validation said.
    assert scores[metric] == pytest.approx(metrics["summary"][f"val_{metric}"], abs=1e-3)


def test_task_comes_from_the_flag_the_config_or_the_model(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"task": "segmentation"}))
    assert task_of(["--model", "centernet_tiny"]) == "detection"
    assert task_of(["--config", str(config)]) == "segmentation"
    assert task_of(["--task", "detection", "--config", str(config)]) == "detection"
    assert task_of(["--model", "resnet18"]) == task_of([]) == "classification"


def test_model_of_another_task_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--task", "detection", "--model", "unet_tiny", "--data", "x"])
    assert "is a segmentation model" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(SCENE_RECIPES))
def test_shipped_configs_match_the_default_repository_builders(name: str) -> None:
    """configs/<name>.yaml is exactly what build-repo trains; configs/<name>_full.yaml (the 3-minute recipe)
    differs only in training length (epochs and pretraining epochs) and speed (amp, channels-last), and
    configs/<name>_long.yaml is the full recipe with more epochs."""
    recipe = SCENE_RECIPES[name]
    shipped = yaml.safe_load((ROOT / "configs" / recipe.config_file).read_text())
    assert {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in shipped.items()} == recipe.options
    full = yaml.safe_load((ROOT / "configs" / f"{name}_full.yaml").read_text())
    length = ("epochs", "pretrain-epochs", "amp", "channels-last")
    assert {k: str(v) for k, v in full.items() if k not in length} == \
        {k: v for k, v in recipe.options.items() if k not in length}
    long = yaml.safe_load((ROOT / "configs" / f"{name}_long.yaml").read_text())
    assert {k: v for k, v in long.items() if k != "epochs"} == {k: v for k, v in full.items() if k != "epochs"}
    assert long["epochs"] > full["epochs"]
    task = load_task(recipe.options["task"])
    for path in (recipe.config_file, f"{name}_full.yaml", f"{name}_long.yaml"):
        args = common.parse_args(task, ["--config", str(ROOT / "configs" / path), "--data", "x"])
        assert args.model == recipe.options["model"]


def test_the_crops_recipe_is_the_full_one_on_windows_for_more_epochs() -> None:
    """configs/unet_scenes_crops.yaml changes only what its comment says: 96 px windows and more epochs."""
    full = yaml.safe_load((ROOT / "configs" / "unet_scenes_full.yaml").read_text())
    crops = yaml.safe_load((ROOT / "configs" / "unet_scenes_crops.yaml").read_text())
    assert {k: v for k, v in crops.items() if k not in ("epochs", "train-crop")} == \
        {k: v for k, v in full.items() if k != "epochs"}
    assert crops["epochs"] > full["epochs"]
    args = common.parse_args(load_task("segmentation"),
                             ["--config", str(ROOT / "configs" / "unet_scenes_crops.yaml"), "--data", "x"])
    assert args.train_crop == 96
    for bad in ("100", "144"):  # not a multiple of 16; larger than the 128 px input
        with pytest.raises(SystemExit):
            common.parse_args(load_task("segmentation"), ["--model", "unet_tiny", "--data", "x", "--train-crop", bad])


def test_val_every_validates_every_nth_epoch_and_the_last(scenes: Path, tmp_path: Path) -> None:
    """--val-every 2 over 3 epochs: validation after epochs 2 and 3 only, and the kept checkpoint is one of them."""
    out = tmp_path / "run"
    assert main(["--model", "unet_tiny", "--data", str(scenes), *TOY, "--epochs", "3", "--val-every", "2",
                 "--train-crop", "64", "--output", str(out)]) == 0
    rows = json.loads((out / "metrics.json").read_text())["epochs"]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all("train_loss" in r for r in rows)
    assert [("val_miou" in r, "val_seconds" in r) for r in rows] == [(False, False), (True, True), (True, True)]
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    assert best["extra"]["best_epoch"] in (2, 3)
    with Image.open(out / "metrics.png") as png:  # the plot takes epochs without validation
        assert png.format == "PNG"
    with pytest.raises(SystemExit):
        common.parse_args(load_task("segmentation"), ["--data", "x", "--val-every", "0"])
