"""What ``make run`` serves: every default model, trained from scratch, is accurate through the real gateway.

The repository is the one ``imgserve build-repo`` builds (the ``default_repository``
fixture: LeNet-5 on MNIST, and ResNet-20, an AlexNet-style net and a DenseNet-BC
on generated shapes). The gateway is a real ``imgserve serve`` process on free
ports, and images travel as PNG files through the SDK over gRPC (and a sample over
HTTP).

Accuracy is measured on shapes the training never saw: a fresh held-out set drawn
with another generator seed. Thresholds carry a margin over the worst of five
seeds measured on two CPUs (see the module constants), so another CPU's rounding,
which trains to other weights, does not flip them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from clients.sdk import ImageClient
from export.build_repo import SHAPES_DATA, SHAPES_RECIPES
from export.data.make_dataset import make_shapes
from tests.procs import run_gateway

pytestmark = pytest.mark.slow

BATCH = 50
# Issue #7's bar for every default shapes model, through the gateway, centre crop.
MIN_ACCURACY = 0.95
# 10-crop averages ten views of a 36 px image; on 32 px crops of centred shapes it mostly agrees with the
# centre crop and may lose a few images to a corner crop that cuts a shape. It must never cost more than this.
MAX_TEN_CROP_LOSS = 0.02
# The gateway and training compute the same crops; ONNX Runtime vs PyTorch float noise may flip a few
# borderline images out of 1000.
SERVED_VS_TRAINING = 0.005
HELDOUT_SEED = 1  # the default build trains and validates on seed 0
HELDOUT_PER_CLASS = 50


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """500 shapes images (50 per class) from a generator seed that no default model trained or chose on."""
    root = tmp_path_factory.mktemp("heldout_shapes")
    make_shapes(root, train_per_class=1, val_per_class=HELDOUT_PER_CLASS, size=SHAPES_DATA["size"],
                seed=HELDOUT_SEED, workers=2, progress=False)
    return sorted((root / "val").glob("*/*.png"))


@pytest.fixture(scope="module")
def training_val(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The build's own validation split, regenerated (the generator is deterministic per seed)."""
    root = tmp_path_factory.mktemp("training_shapes")
    make_shapes(root, train_per_class=1, val_per_class=SHAPES_DATA["val_per_class"], size=SHAPES_DATA["size"],
                seed=SHAPES_DATA["seed"], workers=2, progress=False)
    return sorted((root / "val").glob("*/*.png"))


@pytest.fixture(scope="module")
def gateway(default_repository: Path):  # type: ignore[no-untyped-def]
    with run_gateway(default_repository, extra_args=["--preprocess-threads", "1", "--backend-threads", "1"]) as gw:
        yield gw


def _served(client: ImageClient, name: str, files: list[Path], *, ten_crop: bool | None) -> tuple[float, list[str]]:
    """Accuracy of ``name`` on ``files`` (label = parent folder), and the predicted labels in order."""
    labels: list[str] = []
    for i in range(0, len(files), BATCH):
        chunk = files[i:i + BATCH]
        result = client.classify([f.read_bytes() for f in chunk], name, top_k=1, ten_crop=ten_crop)
        assert len(result) == len(chunk)
        labels += [p.label for p in result.top1]
    truth = [f.parent.name for f in files]
    return sum(a == b for a, b in zip(labels, truth)) / len(files), labels


def _training_summary(default_repository: Path, name: str) -> dict:
    return json.loads((default_repository.parent / "runs" / name / "metrics.json").read_text())["summary"]


def test_default_repository_serves_all_three_families(gateway) -> None:  # type: ignore[no-untyped-def]
    with ImageClient(gateway.grpc_target, timeout=60) as client:
        models = {m.name: m for m in client.models()}
    assert {name for name, info in models.items() if info.task == "classification"} == {"lenet5", *SHAPES_RECIPES}
    for name, recipe in SHAPES_RECIPES.items():
        info = models[name]
        assert (info.num_classes, info.resize, info.crop, info.channels) == (10, 36, 32, 3)
        assert info.ten_crop_default is recipe.ten_crop_default
    assert models["alexnet_cifar"].ten_crop_default is True  # AlexNet's own test-time recipe


@pytest.mark.parametrize("name", sorted(SHAPES_RECIPES))
def test_each_shapes_model_is_accurate_on_unseen_shapes(gateway, heldout: list[Path], name: str) -> None:  # type: ignore[no-untyped-def]
    with ImageClient(gateway.grpc_target, timeout=120) as client:
        centre, _ = _served(client, name, heldout, ten_crop=False)
        ten, _ = _served(client, name, heldout, ten_crop=True)
        default, _ = _served(client, name, heldout[:100], ten_crop=None)
    print(f"\n{name} on {len(heldout)} unseen shapes: centre {centre:.4f}, 10-crop {ten:.4f}")
    assert centre >= MIN_ACCURACY, f"{name}: centre-crop accuracy {centre:.4f} < {MIN_ACCURACY}"
    assert ten >= MIN_ACCURACY, f"{name}: 10-crop accuracy {ten:.4f} < {MIN_ACCURACY}"
    assert ten >= centre - MAX_TEN_CROP_LOSS
    assert default >= MIN_ACCURACY - 0.03  # the model's default mode on a 100-image sample


@pytest.mark.parametrize("name", sorted(SHAPES_RECIPES))
def test_served_accuracy_matches_training(gateway, default_repository: Path, training_val: list[Path],  # type: ignore[no-untyped-def]
                                          name: str) -> None:
    summary = _training_summary(default_repository, name)
    assert summary["val_samples"] == len(training_val) == 1000
    with ImageClient(gateway.grpc_target, timeout=120) as client:
        centre, grpc_labels = _served(client, name, training_val, ten_crop=False)
    with ImageClient(gateway.http_url, timeout=120) as http:
        _, http_labels = _served(http, name, training_val[:100], ten_crop=False)
    assert abs(centre - summary["center_crop_acc"]) <= SERVED_VS_TRAINING
    assert http_labels == grpc_labels[:100]


def test_lenet5_is_accurate_through_the_gateway(gateway, mnist_heldout, record_margin) -> None:  # type: ignore[no-untyped-def]
    import io

    from PIL import Image

    images, labels = mnist_heldout

    def png(a) -> bytes:  # type: ignore[no-untyped-def]
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    predicted: list[int] = []
    with ImageClient(gateway.grpc_target, timeout=120) as client:
        for i in range(0, len(images), BATCH):
            result = client.classify([png(a) for a in images[i:i + BATCH]], "lenet5", top_k=1)
            predicted += [int(p.label) for p in result.top1]
    accuracy = sum(int(p == t) for p, t in zip(predicted, labels)) / len(labels)
    record_margin("default lenet5 accuracy through the gateway", accuracy, 0.975)
    assert accuracy >= 0.975  # the build's seed-0 LeNet; the 98% median over seeds is in test_mnist_lenet.py
