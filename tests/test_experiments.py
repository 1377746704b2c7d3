"""The documented experiments, each run in a tiny configuration through its CLI: the qualitative claims hold.

The numbers are recomputed from the JSON each script writes (not taken from its
own "claims" field), and the PNG plots must exist.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from export.experiments import init_depth, residual_depth, ten_crop

pytestmark = pytest.mark.slow


def _png_ok(path: Path) -> None:
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width >= 400


def test_he_init_trains_a_30_layer_plain_net_and_one_over_n_does_not(tmp_path: Path) -> None:
    rc = init_depth.main(["--depth", "30", "--width", "128", "--epochs", "2", "--threads", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "init_depth_mlp_mnist.json").read_text())
    he, small = result["runs"]["kaiming"], result["runs"]["lecun"]
    chance = math.log(10)
    # At init: He keeps the signal's scale through 29 ReLU layers; Var = 1/n halves its variance per layer.
    assert len(he["layer_std"]) == 30
    assert 0.25 < he["layer_std"][-2] / he["layer_std"][0] < 4
    assert small["layer_std"][-2] / small["layer_std"][0] < 1e-3
    # Training: He's loss falls well below chance; 1/n stays at chance.
    assert he["epoch_loss"][-1] < 0.8 * chance
    assert min(small["epoch_loss"]) > 0.98 * chance
    assert he["val_acc"] > 0.3 and small["val_acc"] < 0.2
    assert rc == 0
    _png_ok(tmp_path / "init_depth_mlp_mnist.png")


def test_shortcuts_fix_the_degradation_of_deep_plain_nets(tmp_path: Path) -> None:
    rc = residual_depth.main(["--depths", "8", "32", "--width", "8", "--train-samples", "800", "--epochs", "2",
                              "--threads", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "residual_depth_mnist.json").read_text())
    loss = {name: run["train_loss"][-1] for name, run in result["runs"].items()}
    assert set(loss) == {"plain-8", "resnet-8", "plain-32", "resnet-32"}
    assert loss["resnet-32"] < 0.8 * loss["plain-32"]   # same depth: shortcuts train far better
    assert loss["plain-32"] > loss["plain-8"]           # plain nets get worse with depth
    assert rc == 0
    _png_ok(tmp_path / "residual_depth_mnist.png")


def test_ten_crop_is_at_least_as_accurate_as_the_centre_crop(tmp_path: Path) -> None:
    rc = ten_crop.main(["--train-per-class", "100", "--val-per-class", "40", "--epochs", "3", "--threads", "2",
                        "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path)])
    result = json.loads((tmp_path / "ten_crop.json").read_text())
    ev = result["eval"]
    assert ev["samples"] == 400 and result["model"] == "cifar_resnet20"
    assert ev["center_acc"] > 0.3  # the model learned something, so the comparison means something
    assert ev["ten_crop_acc"] >= ev["center_acc"]
    assert len(ev["center_per_class"]) == len(ev["ten_crop_per_class"]) == 10
    assert rc == 0
    _png_ok(tmp_path / "ten_crop.png")
