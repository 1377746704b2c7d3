"""Every config.pbtxt we write parses under Triton's own ModelConfig proto (tritonclient's
model_config_pb2), strictly (``text_format.Parse``: an unknown field or a wrong type fails),
and says the same thing after a round trip.

Every writer goes through ``serving.repository.config_text`` (via ``write_model``): the
export (CPU, GPU, GPU + TensorRT, FP16), wrap-onnx, build-repo's publishing step, and the
spec of every task. The test records each text as it is written.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

import serving.repository as repository
from tests.fakes import tiny_detector_spec, tiny_segmenter_spec, tiny_spec
from tests.tiny_onnx import tiny_onnx_repository

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(model name, text) of every config.pbtxt written while the test runs."""
    texts: list[tuple[str, str]] = []
    real = repository.config_text

    def recording(spec: repository.ModelSpec) -> str:
        text = real(spec)
        texts.append((spec.name, text))
        return text

    monkeypatch.setattr(repository, "config_text", recording)
    return texts


def strict_parse(text: str) -> model_config_pb2.ModelConfig:
    cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert text_format.MessageToString(cfg) == text       # nothing dropped or reinterpreted
    return cfg


def variants(spec: repository.ModelSpec) -> list[repository.ModelSpec]:
    return [spec, replace(spec, gpu=True), replace(spec, gpu=True, accelerator=repository.TENSORRT),
            replace(spec, instance_count=2, preferred_batch_sizes=(4, 8))]


@pytest.mark.parametrize("make", [tiny_spec, tiny_detector_spec, tiny_segmenter_spec])
def test_every_task_and_variant_parses(make, tmp_path: Path, written: list[tuple[str, str]]) -> None:
    source = tiny_onnx_repository(tmp_path / "src") / "tiny/1/model.onnx"
    for i, spec in enumerate(variants(make())):
        repository.write_model(tmp_path / str(i), spec, source)
    assert len(written) == 1 + 4            # the source repository's own config, then ours
    for name, text in written:
        cfg = strict_parse(text)
        assert cfg.platform == "onnxruntime_onnx" and cfg.input[0].data_type == model_config_pb2.TYPE_UINT8
    tensorrt = [strict_parse(t) for _, t in written if "tensorrt" in t]
    assert len(tensorrt) == 1
    (accelerator,) = tensorrt[0].optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    assert tensorrt[0].instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    round_trip = repository.spec_from_config(tensorrt[0], list(make().labels), 1)
    assert round_trip.accelerator == repository.TENSORRT and round_trip.gpu


def test_export_wrap_onnx_and_build_repo_write_parseable_configs(tmp_path: Path,
                                                                 written: list[tuple[str, str]]) -> None:
    pytest.importorskip("torch")
    from export.build_repo import publish
    from export.models import create_model, get_entry
    from export.onnx_export import export_to_repository
    from export.wrap_onnx import WrapOptions, wrap_to_repository
    from tests.test_wrap_onnx import foreign_model

    staging = tmp_path / "staging"
    model = create_model("lenet5", num_classes=10).eval()
    labels = [str(i) for i in range(10)]
    for name, kw in (("cpu", {}), ("gpu", {"gpu": True}), ("trt", {"gpu": True, "tensorrt": True}),
                     ("half", {"fp16": True})):
        export_to_repository(model, get_entry("lenet5"), staging, name, labels, **kw)
    wrap_to_repository(foreign_model(tmp_path / "foreign.onnx"), staging, "wrapped", ["a", "b", "c", "d"],
                       WrapOptions(crop=32, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3), resize=36)
    published = publish(staging, tmp_path / "repo")               # what `imgserve build-repo` does last
    assert sorted(n for n, _ in published) == ["cpu", "gpu", "half", "trt", "wrapped"]
    assert len(written) == 10
    by_name: dict[str, list[model_config_pb2.ModelConfig]] = {}
    for name, text in written:
        by_name.setdefault(name, []).append(strict_parse(text))
    assert by_name["trt"][-1].optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"
    assert by_name["half"][-1].parameters["imgserve.precision"].string_value == "fp16"
    for path in (tmp_path / "repo").glob("*/config.pbtxt"):        # and what is on disk
        strict_parse(path.read_text())
