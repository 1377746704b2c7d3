"""``imgserve export`` with real weights: state_dict files, torchvision enum names (offline), random init."""
from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from torchvision.models import ResNet18_Weights

from export import export_cli
from export.engine import save_checkpoint
from export.models import IMAGENET_MEAN, IMAGENET_STD, create_model, get_entry
from export.weights import WeightsError, imagenet_categories, load_file_weights, resolve_enum, weight_names
from serving.repository import read_model


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A torchvision resnet18 state_dict with seeded random weights, as torch.save writes it."""
    torch.manual_seed(123)
    model = torchvision.models.resnet18()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a wrong normalization would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / "resnet18-random.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty torch hub cache and no network, whatever the machine has."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tmp_path / "torch_home"


def test_state_dict_file_exports_faithfully(resnet18_file: tuple[Path, dict], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path, state = resnet18_file
    repo = tmp_path / "repo"
    rc = export_cli.main(["resnet18", "--weights", str(path), "--name", "r18", "--model-repository", str(repo),
                          "--resize", "72", "--crop", "64"])
    assert rc == 0, capsys.readouterr().err
    assert "exported resnet18 (weights from resnet18-random.pth) as r18 v1" in capsys.readouterr().out
    served = read_model(repo / "r18")
    assert served.spec.labels == tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    assert len(served.spec.labels) == 1000 and served.spec.labels[0] == "tench"
    assert (served.spec.preprocess.resize, served.spec.preprocess.crop) == (72, 64)

    # The same weights in plain torchvision, with the normalization done by hand, give the same softmax.
    reference = torchvision.models.resnet18()
    reference.load_state_dict(state)
    reference.eval()
    images = np.random.default_rng(0).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.softmax(reference(x), dim=1).numpy()
    session = ort.InferenceSession(str(served.onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["probabilities"], {"image": images})
    assert got.shape == (3, 1000)
    assert np.abs(got - expected).max() < 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_offline_enum_name_fails_with_a_clear_message(offline: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    rc = export_cli.main(["resnet18", "--weights", "IMAGENET1K_V1", "--model-repository", str(tmp_path / "repo")])
    assert rc != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "ResNet18_Weights.IMAGENET1K_V1" in err and "not in the torch hub cache" in err
    assert "download failed" in err and "--weights /path/to/resnet18-f37072fd.pth" in err
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in err
    assert not (tmp_path / "repo" / "resnet18").exists()


def test_no_download_never_touches_the_network(offline: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    rc = export_cli.main(["resnet50", "--weights", "DEFAULT", "--no-download", "--model-repository", str(tmp_path)])
    assert rc == 2
    assert "ResNet50_Weights.IMAGENET1K_V2" in capsys.readouterr().err  # DEFAULT resolves to V2


def test_enum_names_resolve_per_architecture() -> None:
    resnet50 = get_entry("resnet50")
    assert {"IMAGENET1K_V1", "IMAGENET1K_V2", "DEFAULT"} <= set(weight_names(resnet50))
    assert resolve_enum(resnet50, "imagenet1k_v2").name == "IMAGENET1K_V2"
    assert resolve_enum(resnet50, "DEFAULT").name == "IMAGENET1K_V2"
    assert len(imagenet_categories(get_entry("alexnet"))) == 1000
    with pytest.raises(WeightsError, match="choose one of IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT"):
        resolve_enum(resnet50, "IMAGENET1K_V9")
    with pytest.raises(WeightsError, match="not a torchvision architecture"):
        resolve_enum(get_entry("lenet5"), "DEFAULT")


def test_mismatched_file_names_the_offending_tensors(resnet18_file: tuple[Path, dict], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = resnet18_file
    assert export_cli.main(["resnet34", "--weights", str(path), "--model-repository", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not fit this architecture" in err and "missing: layer1.2" in err and "Traceback" not in err
    assert export_cli.main(["densenet121", "--weights", str(path), "--model-repository", str(tmp_path)]) == 2
    assert "is not a densenet121 state_dict" in capsys.readouterr().err
    assert export_cli.main(["resnet18", "--weights", str(path), "--num-classes", "10",
                            "--model-repository", str(tmp_path)]) == 2
    assert "--num-classes 10 but" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"definitely not a checkpoint", "cannot read"),
    (None, "does not exist"),
])
def test_unreadable_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None,
                          message: str) -> None:
    path = tmp_path / "weights.pth"
    if content is not None:
        path.write_bytes(content)
    assert export_cli.main(["resnet18", "--weights", str(path), "--model-repository", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_wrapped_and_prefixed_state_dicts_load(resnet18_file: tuple[Path, dict], tmp_path: Path) -> None:
    _, state = resnet18_file
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    loaded = load_file_weights(get_entry("resnet18"), wrapped)
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())


def test_imgserve_checkpoint_brings_its_class_names_and_sizes(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", 3)
    save_checkpoint(tmp_path / "best.pt", model, None, epoch=1, best_accuracy=0.5,
                    extra={"classes": ["cat", "dog", "eel"], "resize": 40, "crop": 32})
    repo = tmp_path / "repo"
    assert export_cli.main(["cifar_resnet20", "--weights", str(tmp_path / "best.pt"), "--name", "pets",
                            "--model-repository", str(repo)]) == 0
    served = read_model(repo / "pets")
    assert served.spec.labels == ("cat", "dog", "eel")
    assert (served.spec.preprocess.resize, served.spec.preprocess.crop) == (40, 32)


def test_random_weights_come_with_a_loud_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\n")
    repo = tmp_path / "repo"
    assert export_cli.main(["cifar_resnet20", "--labels", str(labels), "--model-repository", str(repo)]) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "RANDOM weights" in err and "meaningless" in err
    assert read_model(repo / "cifar_resnet20").spec.labels == ("a", "b", "c")
    assert export_cli.main(["nonet", "--model-repository", str(repo)]) == 2
    assert "unknown model 'nonet'" in capsys.readouterr().err
