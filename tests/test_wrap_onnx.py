"""``imgserve wrap-onnx``: a foreign ONNX classifier becomes a servable repository model, or a clear error."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from export.wrap_onnx import WrapError, WrapOptions, wrap_to_repository
from procs import imgserve_executable
from serving.repository import read_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def foreign_model(path: Path, *, layout: str = "NCHW", size: int = 32, classes: int = 4, softmax: bool = False,
                  outputs: int = 1) -> Path:
    """A small float32 classifier as other tools export it (dynamic batch axis)."""
    import torch
    from torch import nn

    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.head = nn.Linear(8, classes)

        def forward(self, x: torch.Tensor):  # type: ignore[no-untyped-def]
            if layout == "NHWC":
                x = x.permute(0, 3, 1, 2)
            logits = self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))
            out = torch.softmax(logits, dim=1) if softmax else logits
            return (out, logits * 2) if outputs == 2 else out

    example = torch.zeros(1, 3, size, size) if layout == "NCHW" else torch.zeros(1, size, size, 3)
    names = ["scores", "extra"][:outputs]
    torch.onnx.export(Net().eval(), (example,), str(path), input_names=["pixels"], output_names=names,
                      dynamic_axes={"pixels": {0: "n"}, **{n: {0: "n"} for n in names}}, dynamo=False)
    return path


def reference(path: Path, crops: np.ndarray, layout: str, softmax_needed: bool) -> np.ndarray:
    """What the wrapped graph must return: normalize in NumPy, run the original, softmax."""
    import onnxruntime as ort

    x = (crops.astype(np.float32) / 255.0 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run([session.get_outputs()[0].name], {"pixels": np.ascontiguousarray(x)})[0]
    if softmax_needed:
        out = np.exp(out - out.max(axis=1, keepdims=True))
        out /= out.sum(axis=1, keepdims=True)
    return out


@pytest.mark.parametrize("layout, softmax", [("NCHW", False), ("NHWC", True)])
def test_wrapped_graph_matches_the_original(tmp_path: Path, layout: str, softmax: bool) -> None:
    import onnxruntime as ort

    source = foreign_model(tmp_path / "m.onnx", layout=layout, softmax=softmax)
    options = WrapOptions(crop=32, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, layout=layout,
                          output="probabilities" if softmax else "logits")
    result = wrap_to_repository(source, tmp_path / "repo", "foreign", ["a", "b", "c", "d"], options, resize=36,
                                description="from elsewhere")
    local = read_model(tmp_path / "repo" / "foreign")
    assert result.version == 1 and local.spec.labels == ("a", "b", "c", "d") and local.spec.description == "from elsewhere"
    assert (local.spec.preprocess.resize, local.spec.preprocess.crop, local.spec.preprocess.channels) == (36, 32, 3)
    session = ort.InferenceSession(str(local.onnx_path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, out.name) == ("image", "tensor(uint8)", "probabilities")
    crops = np.random.default_rng(1).integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    got = session.run(["probabilities"], {"image": crops})[0]
    np.testing.assert_allclose(got, reference(source, crops, layout, not softmax), atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    # a second wrap is a new version; the first stays
    assert wrap_to_repository(source, tmp_path / "repo", "foreign", "abcd", options, resize=36).version == 2


@pytest.mark.parametrize("case, fragment", [
    ("wrong crop", "read as NCHW that is 32x32 pixels with 3 channels, not --crop 28"),
    ("wrong layout", "read as NHWC that is 3x32 pixels with 32 channels"),
    ("label count", "expected [3, 3]"),
    ("two outputs", "--output-name"),
    ("probabilities that are logits", "do not sum to 1"),
])
def test_unusable_graphs_are_refused_with_a_reason(tmp_path: Path, case: str, fragment: str) -> None:
    source = foreign_model(tmp_path / "m.onnx", outputs=2 if case == "two outputs" else 1)
    options = dict(crop=32, channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    labels = ["a", "b", "c", "d"]
    if case == "wrong crop":
        options["crop"] = 28
    elif case == "wrong layout":
        options["layout"] = "NHWC"
    elif case == "label count":
        labels = ["a", "b", "c"]
    elif case == "probabilities that are logits":
        options["output"] = "probabilities"
    with pytest.raises(WrapError) as info:
        wrap_to_repository(source, tmp_path / "repo", "foreign", labels, WrapOptions(**options), resize=36)
    assert fragment in str(info.value)
    assert not (tmp_path / "repo" / "foreign").exists()  # nothing written on failure


def test_cli_reports_errors_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("a\nb\n")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx at all")
    result = subprocess.run([str(imgserve_executable()), "wrap-onnx", str(tmp_path / "junk.onnx"), "--name", "x",
                             "--labels", str(tmp_path / "labels.txt"), "--resize", "36", "--crop", "32",
                             "--model-repository", str(tmp_path / "repo")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("imgserve wrap-onnx: ") and len(result.stderr.strip().splitlines()) == 1
