"""The generated shapes dataset: deterministic, >= 10 classes, sizes in range, an ImageFolder, not colour-separable."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.data import make_dataset
from export.data.make_dataset import MANIFEST, make_shapes
from export.data.shapes import MAX_SIZE, MIN_SIZE, SHAPES, ShapesConfig, generate


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.png"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "data"
    make_shapes(out, train_per_class=6, val_per_class=3, seed=7, progress=False)
    return out


def test_default_has_ten_classes_as_an_imagefolder(dataset: Path) -> None:
    classes = sorted(p.name for p in (dataset / "train").iterdir())
    assert len(classes) >= 10
    assert classes == sorted(SHAPES[:10])
    for split, per_class in (("train", 6), ("val", 3)):
        assert sorted(p.name for p in (dataset / split).iterdir()) == classes
        for name in classes:
            files = sorted((dataset / split / name).iterdir())
            assert len(files) == per_class
            assert all(f.suffix == ".png" and f.name.startswith(name) for f in files)
    manifest = json.loads((dataset / MANIFEST).read_text())
    assert manifest["classes"] == list(SHAPES[:10])
    assert manifest["counts"] == {"train": 60, "val": 30}
    assert manifest["config"]["seed"] == 7


def test_torchvision_reads_it_with_sorted_class_indices(dataset: Path) -> None:
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(dataset / "val"))
    assert folder.classes == sorted(SHAPES[:10])
    assert len(folder) == 30
    img, label = folder[0]
    assert img.mode == "RGB" and label == 0


def test_same_seed_same_bytes_other_seed_other_images(dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    make_shapes(again, train_per_class=6, val_per_class=3, seed=7, progress=False)
    a, b = _files(dataset), _files(again)
    assert [p.relative_to(dataset) for p in a] == [p.relative_to(again) for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    # An image does not depend on how many others were generated (per-image generators).
    assert np.array_equal(np.asarray(generate(ShapesConfig(seed=7), "train", 2, 5)),
                          np.asarray(Image.open(dataset / "train" / SHAPES[2] / f"{SHAPES[2]}_00005.png")))
    other = np.asarray(generate(ShapesConfig(seed=8), "train", 2, 5))
    same = np.asarray(generate(ShapesConfig(seed=7), "train", 2, 5))
    assert other.shape != same.shape or not np.array_equal(other, same)
    # Splits draw from different streams.
    val = np.asarray(generate(ShapesConfig(seed=7), "val", 2, 5))
    assert val.shape != same.shape or not np.array_equal(val, same)


@pytest.mark.parametrize("size", [MIN_SIZE, 64, MAX_SIZE])
def test_image_sizes_stay_in_range(size: int) -> None:
    config = ShapesConfig(size=size, classes=len(SHAPES))
    lo, hi = config.side_range
    assert MIN_SIZE <= lo <= size <= hi <= MAX_SIZE
    seen = set()
    for c in range(config.classes):
        for i in range(4):
            img = generate(config, "train", c, i)
            assert img.mode == "RGB"
            assert lo <= img.width <= hi and lo <= img.height <= hi
            seen.add(img.size)
    assert len(seen) > 1, "sizes should vary from image to image"


def test_all_twelve_shapes_render_and_differ() -> None:
    config = ShapesConfig(classes=len(SHAPES), size=48)
    images = [np.asarray(generate(config, "train", c, 0)) for c in range(config.classes)]
    assert len(images) == 12
    for img in images:
        assert img.std() > 10, "an image should not be flat"


def test_colour_alone_does_not_separate_the_classes() -> None:
    """Nearest-centroid on each image's mean colour stays near chance: the class is in the shape."""
    config = ShapesConfig(size=40)

    def mean_rgb(split: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        feats = [np.asarray(generate(config, split, c, i), dtype=np.float64).reshape(-1, 3).mean(0)
                 for c in range(config.classes) for i in range(n)]
        return np.array(feats), np.repeat(np.arange(config.classes), n)

    x_train, y_train = mean_rgb("train", 20)
    x_val, y_val = mean_rgb("val", 10)
    centroids = np.stack([x_train[y_train == c].mean(0) for c in range(config.classes)])
    pred = np.argmin(((x_val[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == y_val).mean() < 0.3  # chance is 0.1


def test_cli_writes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    rc = make_dataset.main(["shapes", "--out", str(out), "--classes", "12", "--train-per-class", "2",
                            "--val-per-class", "1", "--size", "32", "--no-progress"])
    assert rc == 0
    assert "24 train + 12 val images of 12 classes" in capsys.readouterr().out
    assert len(_files(out / "train")) == 24 and len(_files(out / "val")) == 12


@pytest.mark.parametrize("args, message", [
    (["--classes", "1"], "classes must be in [2, 12]"),
    (["--classes", "13"], "classes must be in [2, 12]"),
    (["--size", "20"], "size must be in [32, 96]"),
    (["--size", "97"], "size must be in [32, 96]"),
])
def test_cli_rejects_bad_options(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                 message: str) -> None:
    rc = make_dataset.main(["shapes", "--out", str(tmp_path / "bad"), "--no-progress", *args])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_to_mix_datasets_unless_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "twice"
    base = ["shapes", "--out", str(out), "--train-per-class", "1", "--val-per-class", "1", "--no-progress"]
    assert make_dataset.main(base) == 0
    assert make_dataset.main(base + ["--seed", "3"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert make_dataset.main(base + ["--seed", "3", "--overwrite", "--classes", "3"]) == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(SHAPES[:3])


def test_zero_images_per_class_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        make_dataset.main(["shapes", "--out", str(tmp_path / "x"), "--train-per-class", "0"])
    assert exc.value.code == 2
