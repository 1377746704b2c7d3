"""ONNX export: the serving contract (uint8 NHWC in, softmax out, dynamic batch) and parity with PyTorch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.requirements import require_module  # noqa: E402

torch = require_module("torch")
onnx = require_module("onnx")
ort = require_module("onnxruntime")

from export.models import create_model, get_entry  # noqa: E402
from export.onnx_export import (INPUT_NAME, OUTPUT_NAME, ExportError, build_serving_graph,  # noqa: E402
                                export_to_repository)
from serving.repository import RepositoryError, read_model, scan_repository  # noqa: E402


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)


def _session(path: Path) -> "ort.InferenceSession":
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _labels(n: int) -> list[str]:
    return [f"c{i}" for i in range(n)]


@pytest.mark.parametrize("arch", [
    pytest.param("alexnet", marks=pytest.mark.slow),
    "resnet18",
    pytest.param("resnet50", marks=pytest.mark.slow),
    pytest.param("densenet121", marks=pytest.mark.slow),
    "cifar_alexnet",
    "cifar_densenet_bc",
])
def test_registry_models_export_with_parity(arch: str, tmp_path: Path) -> None:
    entry = get_entry(arch)
    torch.manual_seed(0)
    model = create_model(arch, num_classes=4)
    result = export_to_repository(model, entry, tmp_path, arch, _labels(4))
    assert result.parity_max_abs_diff <= 1e-4 and result.parity_logits_max_rel_diff <= 1e-4
    assert result.version == 1 and result.path == tmp_path / arch / "1" / "model.onnx"
    assert model.training, "export must leave the caller's model in the mode it was in"

    # The contract: one uint8 NHWC input with a symbolic batch axis, one float32 [batch, K] output.
    proto = onnx.load(str(result.path), load_external_data=False)
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert inp.name == INPUT_NAME and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [entry.crop, entry.crop, 3]
    assert out.name == OUTPUT_NAME and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out.type.tensor_type.shape.dim[0].dim_param and out.type.tensor_type.shape.dim[1].dim_value == 4

    graph = build_serving_graph(model, entry)
    session = _session(result.path)
    rng = np.random.default_rng(1)
    for batch in (1, 5):
        images = rng.integers(0, 256, size=(batch, entry.crop, entry.crop, 3), dtype=np.uint8)
        (probs,) = session.run([OUTPUT_NAME], {INPUT_NAME: images})
        assert probs.shape == (batch, 4) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        assert (probs >= 0).all()
        with torch.no_grad():
            expected = graph(torch.from_numpy(images)).numpy()
        np.testing.assert_allclose(probs, expected, atol=1e-4)

    spec = read_model(tmp_path / arch).spec
    assert spec.preprocess.resize == entry.resize and spec.preprocess.crop == entry.crop
    assert spec.preprocess.ten_crop_default == entry.ten_crop_default
    assert spec.extra["architecture"] == arch and spec.labels == tuple(_labels(4))


def test_graph_normalizes_inside_with_registry_mean_std(tmp_path: Path) -> None:
    """A flat grey image reaches the network as (v/255 - mean)/std per channel."""
    entry = get_entry("resnet18")
    captured: list[torch.Tensor] = []
    model = create_model("resnet18", num_classes=3).eval()
    model.register_forward_pre_hook(lambda _m, args: captured.append(args[0].clone()))
    graph = build_serving_graph(model, entry, crop=32)
    image = torch.full((1, 32, 32, 3), 200, dtype=torch.uint8)
    with torch.no_grad():
        graph(image)
    x = captured[0]
    assert x.shape == (1, 3, 32, 32)
    for c in range(3):
        want = (200 / 255 - entry.mean[c]) / entry.std[c]
        assert torch.allclose(x[0, c], torch.full((32, 32), want), atol=1e-6)


def test_lenet_graph_pads_with_black_before_normalizing() -> None:
    entry = get_entry("lenet5")
    captured: list[torch.Tensor] = []
    model = create_model("lenet5", num_classes=10).eval()
    model.register_forward_pre_hook(lambda _m, args: captured.append(args[0].clone()))
    digit = torch.randint(0, 256, (2, 28, 28, 1), dtype=torch.uint8)
    with torch.no_grad():
        build_serving_graph(model, entry)(digit)
    x = captured[0]
    assert x.shape == (2, 1, 32, 32)
    black = (0 - entry.mean[0]) / entry.std[0]
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.allclose(x[:, 0][:, border], torch.full_like(x[:, 0][:, border], black))
    inner = (digit[..., 0].float() / 255 - entry.mean[0]) / entry.std[0]
    assert torch.allclose(x[:, 0, 2:30, 2:30], inner, atol=1e-6)


def test_small_input_override_and_version_bump(tmp_path: Path) -> None:
    entry = get_entry("resnet18")
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=3)
    first = export_to_repository(model, entry, tmp_path, "small", _labels(3), resize=40, crop=32, max_batch_size=8,
                                 max_queue_delay_us=500, gpu=True, ten_crop_default=True)
    first_bytes = first.path.read_bytes()
    second = export_to_repository(model, entry, tmp_path, "small", _labels(3), crop=32)
    assert (first.version, second.version) == (1, 2)
    assert first.path.read_bytes() == first_bytes, "an export must never overwrite a served version"
    served = scan_repository(tmp_path)["small"]
    assert served.onnx_path == second.path and served.spec.version == 2
    # crop alone keeps the registry's 256:224 ratio for resize.
    assert (served.spec.preprocess.resize, served.spec.preprocess.crop) == (round(32 * 256 / 224), 32)
    assert first.spec.gpu and first.spec.max_batch_size == 8 and first.spec.max_queue_delay_us == 500
    assert first.spec.preprocess.ten_crop_default and not served.spec.preprocess.ten_crop_default


def test_bad_requests_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    entry = get_entry("resnet18")
    model = create_model("resnet18", num_classes=3)
    with pytest.raises(ValueError, match="labels"):
        export_to_repository(model, entry, tmp_path, "m", _labels(5), crop=32)
    with pytest.raises(RepositoryError):
        export_to_repository(model, entry, tmp_path, "m", _labels(3), resize=16, crop=32)
    with pytest.raises(ValueError):
        export_to_repository(model, entry, tmp_path, "../escape", _labels(3), crop=32)
    with pytest.raises(ValueError):
        export_to_repository(create_model("lenet5", 10), get_entry("lenet5"), tmp_path, "m", _labels(10), crop=40)
    assert not any(tmp_path.iterdir())


def test_parity_failure_raises_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ONNX file that computes something else than the PyTorch model is caught at the default tolerance.

    The exporter is made to trace a copy of the model whose classifier bias is shifted, the kind of
    divergence a broken export produces (a wrong constant folded in), so the check has a real
    difference to find rather than float noise that may or may not exist on a given CPU.
    """
    import copy

    import export.onnx_export as onnx_export

    real_export = onnx_export.export_onnx

    def export_a_different_model(graph, path, **kwargs):  # type: ignore[no-untyped-def]
        wrong = copy.deepcopy(graph)
        with torch.no_grad():
            wrong.model.fc.bias.add_(torch.linspace(-1.0, 1.0, wrong.model.fc.bias.numel()))
        return real_export(wrong, path, **kwargs)

    monkeypatch.setattr(onnx_export, "export_onnx", export_a_different_model)
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", num_classes=3)
    with pytest.raises(ExportError, match="parity"):
        export_to_repository(model, get_entry("cifar_resnet20"), tmp_path, "m", _labels(3))
    assert not (tmp_path / "m").exists()
    # The same model through the real exporter passes, so it is the divergence that was caught.
    monkeypatch.setattr(onnx_export, "export_onnx", real_export)
    assert export_to_repository(model, get_entry("cifar_resnet20"), tmp_path, "m", _labels(3)).version == 1
