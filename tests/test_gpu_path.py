"""The GPU path where no GPU is: provider selection and its CPU fallback (monkeypatched
``onnxruntime.get_available_providers``), the I/O-binding runner's pinned-memory fallback,
and FP16 export parity. A real CUDA run is benchmarks/gpu/run.sh on a GPU node."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from serving.backends import onnxruntime as ort_backend
from serving.backends.ort_device import (CPU, CUDA, Device, IoBoundRunner, parse_device, select_providers)
from serving.settings import Settings
from tests.tiny_onnx import tiny_onnx_repository

pytestmark = pytest.mark.timeout(120)


def test_device_parsing() -> None:
    assert parse_device("cpu") == Device("cpu") and parse_device("CUDA") == Device("cuda", 0)
    assert parse_device("cuda:3") == Device("cuda", 3) and str(Device("cuda", 3)) == "cuda:3"
    for bad in ("gpu", "cuda:", "cuda:x", "tpu:0"):
        with pytest.raises(ValueError, match="cpu, cuda or cuda:N"):
            parse_device(bad)
    with pytest.raises(ValueError):
        Settings(device="gpu0").validate()


def test_provider_selection() -> None:
    both = [CUDA, CPU]
    assert select_providers(Device("cpu"), False, both, "m").providers == [CPU]
    chosen = select_providers(Device("cuda", 2), False, both, "m")
    assert chosen.providers == [(CUDA, {"device_id": 2}), CPU] and chosen.device == Device("cuda", 2)
    assert not chosen.warning
    kind_gpu = select_providers(Device("cpu"), True, both, "m")        # KIND_GPU in config.pbtxt
    assert kind_gpu.providers[0] == (CUDA, {"device_id": 0})
    fallback = select_providers(Device("cuda", 1), False, [CPU], "resnet")
    assert fallback.providers == [CPU] and fallback.device == Device("cpu")
    assert "no CUDAExecutionProvider" in fallback.warning and "onnxruntime-gpu" in fallback.warning
    assert "--device cuda:1" in fallback.warning and "resnet" in fallback.warning


async def test_cuda_device_selects_the_cuda_provider_and_io_binding(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend onnxruntime has CUDA: the session is asked for CUDAExecutionProvider on device 1 and
    calls go through the I/O-binding runner (here backed by the CPU, since there is no GPU)."""
    repo = tiny_onnx_repository(tmp_path)
    asked: list[object] = []
    real_session = ort.InferenceSession

    def session(path: str, sess_options: object = None, providers: object = None) -> ort.InferenceSession:
        asked.append(providers)
        return real_session(path, sess_options=sess_options, providers=[CPU])

    used: list[tuple[int, ...]] = []

    def run_on_cpu(self: IoBoundRunner, batch: np.ndarray) -> list[np.ndarray]:
        used.append(batch.shape)
        return self.session.run(self.output_names, {self.input_name: batch})

    monkeypatch.setattr(ort_backend.ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort_backend.ort, "InferenceSession", session)
    monkeypatch.setattr(IoBoundRunner, "run", run_on_cpu)
    backend = ort_backend.OnnxRuntimeBackend(Settings(model_repository=repo, device="cuda:1"))
    await backend.start()
    try:
        loaded = backend._models["tiny"]
        assert asked == [[(CUDA, {"device_id": 1}), CPU]]
        assert loaded.device == Device("cuda", 1) and isinstance(loaded.runner, IoBoundRunner)
        out = await backend.infer("tiny", np.zeros((2, 4, 4, 1), dtype=np.uint8))
        assert out["probabilities"].shape == (2, 3)
        assert (2, 4, 4, 1) in used                      # the warm-up (1, ...) and this call
    finally:
        await backend.close()


async def test_missing_cuda_provider_falls_back_to_cpu_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tiny_onnx_repository(tmp_path)
    monkeypatch.setattr(ort_backend.ort, "get_available_providers", lambda: [CPU])
    backend = ort_backend.OnnxRuntimeBackend(Settings(model_repository=repo, device="cuda:0"))
    with caplog.at_level(logging.WARNING, logger="serving.backends.onnxruntime"):
        await backend.start()
    try:
        assert any("no CUDAExecutionProvider" in r.getMessage() and "running on the CPU" in r.getMessage()
                   for r in caplog.records)
        assert backend._models["tiny"].device == Device("cpu") and backend._models["tiny"].runner is None
        out = await backend.infer("tiny", np.zeros((1, 4, 4, 1), dtype=np.uint8))
        assert out["probabilities"].shape == (1, 3)
    finally:
        await backend.close()


class RecordingBinding:
    def __init__(self, session: "FakeCudaSession") -> None:
        self.session = session
        self.calls: list[tuple] = []

    def bind_cpu_input(self, name: str, array: np.ndarray) -> None:
        self.calls.append(("cpu_input", name, array.shape))

    def bind_ortvalue_input(self, name: str, value: object) -> None:
        self.calls.append(("ortvalue_input", name))

    def bind_output(self, name: str, device_type: str = "cpu", device_id: int = 0) -> None:
        self.calls.append(("output", name, device_type, device_id))

    def copy_outputs_to_cpu(self) -> list[np.ndarray]:
        return [np.ones((2, 3), dtype=np.float32)]


class FakeCudaSession:
    def __init__(self) -> None:
        self.bindings: list[RecordingBinding] = []

    def io_binding(self) -> RecordingBinding:
        self.bindings.append(RecordingBinding(self))
        return self.bindings[-1]

    def run_with_iobinding(self, binding: RecordingBinding) -> None:
        binding.calls.append(("run",))


def test_io_binding_falls_back_to_pageable_memory_where_pinned_cannot_be_allocated() -> None:
    """The CPU onnxruntime here cannot allocate ``cuda_pinned`` memory: the runner notices once,
    binds the input from host memory and the outputs to the CPU, and keeps working."""
    session = FakeCudaSession()
    runner = IoBoundRunner(session, "image", ["probabilities"], Device("cuda", 0))
    batch = np.zeros((2, 4, 4, 1), dtype=np.uint8)
    (out,) = runner.run(batch)
    assert out.shape == (2, 3) and not runner.pinned
    assert session.bindings[0].calls == [("cpu_input", "image", (2, 4, 4, 1)), ("output", "probabilities", "cpu", 0),
                                         ("run",)]
    runner.run(batch)
    assert session.bindings[1].calls[0][0] == "cpu_input"


def test_fp16_conversion_keeps_io_types_and_passes_parity(tmp_path: Path) -> None:
    pytest.importorskip("onnxconverter_common")
    from export.fp16 import Fp16ParityError, check_fp16_parity, convert_to_fp16

    repo = tiny_onnx_repository(tmp_path)
    source = repo / "tiny" / "1" / "model.onnx"
    half = tmp_path / "half.onnx"
    convert_to_fp16(source, half)
    session = ort.InferenceSession(str(half), providers=[CPU])
    assert [i.type for i in session.get_inputs()] == ["tensor(uint8)"]
    assert [o.type for o in session.get_outputs()] == ["tensor(float)"]
    import onnx

    weights = [t for t in onnx.load(str(half)).graph.initializer if t.name.startswith("w")]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    parity = check_fp16_parity(source, half, crop=4, channels=1)
    assert parity.top1_agreement >= 0.95 and parity.max_abs_prob_diff <= 0.02 and parity.images == 32
    with pytest.raises(Fp16ParityError, match="top-1 agreement"):
        check_fp16_parity(source, half, crop=4, channels=1, prob_atol=-1.0)   # an impossible tolerance
