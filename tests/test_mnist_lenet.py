"""The MNIST split, the training engine and LeNet-5's accuracy on held-out digits."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tests.requirements import require_module  # noqa: E402

torch = require_module("torch")

from export.data.mnist import MnistDataset, load_mnist_5k, mnist_split  # noqa: E402
from export.engine import (MetricsLog, load_checkpoint, save_checkpoint, seed_everything,  # noqa: E402
                           train_one_epoch, validate)
from export.models import MNIST_MEAN, MNIST_STD, create_model  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_bundled_mnist_is_real_digits() -> None:
    data = load_mnist_5k()
    assert data.images.shape == (5000, 28, 28) and data.images.dtype == np.uint8
    assert data.labels.shape == (5000,) and data.labels.dtype == np.int64
    assert set(np.unique(data.labels)) == set(range(10))
    # Real handwriting: dark background, bright strokes in the middle, blank borders.
    assert data.images.max() == 255
    assert data.images[:, :, :2].mean() < 1.0 and data.images[:, 10:18, 10:18].mean() > 60


def test_split_is_reproducible_disjoint_and_stratified() -> None:
    a = mnist_split()
    mnist_split.cache_clear()
    b = mnist_split()
    assert len(a.train) == 4000 and len(a.test) == 1000
    np.testing.assert_array_equal(a.test.images, b.test.images)
    np.testing.assert_array_equal(a.train.labels, b.train.labels)
    full = load_mnist_5k()
    # Every row of the file ends up in exactly one part, and the parts hold those rows.
    np.testing.assert_array_equal(np.sort(np.concatenate([a.train_index, a.test_index])), np.arange(5000))
    np.testing.assert_array_equal(a.test.images, full.images[a.test_index])
    np.testing.assert_array_equal(a.train.labels, full.labels[a.train_index])
    # Stratified: each class's share in the test part matches the file's within one image.
    expected = np.bincount(full.labels, minlength=10) * 1000 / 5000
    assert np.all(np.abs(np.bincount(a.test.labels, minlength=10) - expected) <= 1)
    assert not np.array_equal(mnist_split(seed=1).test_index, a.test_index)


def test_dataset_pads_black_before_normalizing() -> None:
    split = mnist_split()
    ds = MnistDataset(split.test, mean=MNIST_MEAN[0], std=MNIST_STD[0], pad_to=32)
    x, y = ds[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and int(y) == int(split.test.labels[0])
    black = (0.0 - MNIST_MEAN[0]) / MNIST_STD[0]
    assert torch.allclose(x[0, :2, :], torch.full((2, 32), black))
    inner = (torch.from_numpy(split.test.images[0].astype(np.float32)) / 255 - MNIST_MEAN[0]) / MNIST_STD[0]
    assert torch.allclose(x[0, 2:30, 2:30], inner)
    with pytest.raises(ValueError):
        MnistDataset(split.test, mean=0.1, std=0.3, pad_to=27)
    with pytest.raises(ValueError):
        MnistDataset(split.test, mean=0.1, std=0.3, pad_to=32, max_shift=3)


def test_shift_augmentation_moves_the_digit_without_losing_it() -> None:
    split = mnist_split()
    ds = MnistDataset(split.train, mean=0.0, std=1.0, pad_to=32, max_shift=2, seed=3)
    total = float(split.train.images[5].astype(np.float64).sum() / 255)
    sums = {round(float(ds[5][0].sum()), 3) for _ in range(20)}
    assert sums == {round(total, 3)}  # a shift of <= 2 px inside a 2 px border never crops ink
    positions = {tuple(torch.nonzero(ds[5][0][0]).min(dim=0).values.tolist()) for _ in range(30)}
    assert len(positions) > 1


def _tiny_loaders(n: int = 512):
    split = mnist_split()
    from torch.utils.data import DataLoader, Subset

    ds = MnistDataset(split.train, mean=MNIST_MEAN[0], std=MNIST_STD[0])
    test = MnistDataset(split.test, mean=MNIST_MEAN[0], std=MNIST_STD[0])
    return (DataLoader(Subset(ds, range(n)), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)),
            DataLoader(Subset(test, range(256)), batch_size=128))


def test_training_loss_drops_and_checkpoint_resumes_exactly(tmp_path) -> None:
    seed_everything(0)
    train_loader, test_loader = _tiny_loaders()
    model = create_model("lenet5", 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    crit = torch.nn.CrossEntropyLoss()
    before = validate(model, test_loader, crit, "cpu")
    losses = [train_one_epoch(model, train_loader, opt, crit, "cpu", scheduler=sched, progress=False).loss
              for _ in range(3)]
    after = validate(model, test_loader, crit, "cpu")
    assert losses[-1] < losses[0] * 0.7
    assert after.loss < before.loss and after.accuracy > before.accuracy + 0.3
    assert after.samples == 256 and 0.0 <= after.accuracy <= 1.0

    ckpt = save_checkpoint(tmp_path / "ckpt.pt", model, opt, epoch=3, best_accuracy=after.accuracy, scheduler=sched,
                           extra={"arch": "lenet5"})
    model2 = create_model("lenet5", 10)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=4, gamma=0.5)
    state = load_checkpoint(ckpt, model2, opt2, scheduler=sched2)
    assert (state.epoch, state.next_epoch, state.best_accuracy, state.extra) == (3, 4, after.accuracy, {"arch": "lenet5"})
    assert sched2.last_epoch == sched.last_epoch and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for p, q in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(p, q)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt", model2)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):
        load_checkpoint(tmp_path / "junk.pt", model2)


def test_nonfinite_loss_is_reported() -> None:
    train_loader, _ = _tiny_loaders(64)
    model = create_model("lenet5", 10)
    opt = torch.optim.SGD(model.parameters(), lr=1e30)
    with pytest.raises(FloatingPointError):
        for _ in range(3):
            train_one_epoch(model, train_loader, opt, torch.nn.CrossEntropyLoss(), "cpu", progress=False)


def test_metrics_log_writes_json_csv_png_and_reloads(tmp_path) -> None:
    log = MetricsLog(tmp_path / "run")
    log.append(1, train_loss=1.0, test_acc=0.5)
    log.append(2, train_loss=0.5, test_acc=0.8)
    log.append(2, train_loss=0.4, test_acc=0.9)  # a resumed epoch replaces its row
    log.summary["test_accuracy"] = 0.9
    log.write()
    data = json.loads(log.json_path.read_text())
    assert [r["epoch"] for r in data["epochs"]] == [1, 2] and data["epochs"][1]["train_loss"] == 0.4
    rows = list(csv.DictReader(log.csv_path.open()))
    assert [float(r["test_acc"]) for r in rows] == [0.5, 0.9]
    assert log.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = MetricsLog.load(tmp_path / "run")
    assert again.rows == log.rows and again.summary == {"test_accuracy": 0.9}
    with pytest.raises(ValueError):
        log.append(3, train_loss=float("nan"))


# Issue #7: LeNet-5 reaches >= 98.0% median test accuracy over 3 seeds on any CPU. With the 25-epoch
# recipe, seeds 0-4 at one thread gave 98.3, 98.4, 98.0, 98.3 and 98.6% (15 epochs gave 98.1, 98.6,
# 98.0, 97.6, 98.1%, too close to the bar), so the median of three sits about 0.3 points above it.
MEDIAN_TARGET = 0.980


@pytest.mark.slow
def test_lenet_reaches_target_accuracy_on_heldout_digits(lenet_run, tmp_path, stat_seed: int, record_margin) -> None:
    from export.lenet import train_lenet

    result = lenet_run.result
    assert result.test_samples == 1000 and result.train_samples == 4000
    data = json.loads(result.metrics_json.read_text())
    epochs = data["epochs"]
    assert len(epochs) == result.epochs
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"] / 3
    assert data["summary"]["test_accuracy"] == pytest.approx(result.test_accuracy)
    assert result.metrics_png.is_file() and result.metrics_png.stat().st_size > 5000
    assert (lenet_run.out_dir / "metrics.csv").is_file()
    # The session's run is seed 0; two more seeds make the median a claim about the recipe, not one draw.
    accuracies = [result.test_accuracy]
    for seed in (stat_seed + 1, stat_seed + 2):
        accuracies.append(train_lenet(tmp_path / f"seed{seed}", seed=seed, progress=False)[1].test_accuracy)
    median = sorted(accuracies)[1]
    record_margin("lenet5: median test accuracy of 3 seeds", median, MEDIAN_TARGET)
    assert median >= MEDIAN_TARGET, f"LeNet-5 median held-out accuracy {median:.4f} < {MEDIAN_TARGET} ({accuracies})"


@pytest.mark.slow
def test_exported_lenet_matches_training_accuracy(lenet_offline_predictions, lenet_run, mnist_heldout) -> None:
    """The ONNX graph (uint8 in, padding + normalization inside) scores like the PyTorch model it came from."""
    images, labels = mnist_heldout
    offline = lenet_offline_predictions
    assert offline.probabilities.shape == (1000, 10) and offline.classes.shape == (1000,)
    np.testing.assert_allclose(offline.probabilities.sum(axis=1), 1.0, atol=1e-5)
    # PyTorch on the training-side input pipeline (pad raw, then normalize) gives the same probabilities.
    ds = MnistDataset(mnist_split().test, mean=MNIST_MEAN[0], std=MNIST_STD[0], pad_to=32)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        expected = torch.softmax(lenet_run.model.eval()(x), dim=1).numpy()
    np.testing.assert_allclose(offline.probabilities, expected, atol=1e-4)
    # ONNX Runtime and PyTorch round differently; a borderline digit or two may flip, never more.
    assert offline.accuracy == pytest.approx(lenet_run.result.test_accuracy, abs=0.0021)
    assert offline.accuracy == pytest.approx(float((offline.classes == labels).mean()))
