"""Where the embedded backend runs a model: CPU, or CUDA with I/O binding and pinned host memory.

Selection (``--device``): ``cpu`` (default) keeps every model on the CPU unless its
``config.pbtxt`` asks for KIND_GPU instances; ``cuda`` / ``cuda:N`` put every model on
GPU N with the CUDA execution provider. When onnxruntime has no CUDA provider (the CPU
wheel; the ``gpu`` extra installs onnxruntime-gpu) the backend says so loudly once and
runs on the CPU: a misconfigured node is slow, never down.

On CUDA a call goes through I/O binding: the uint8 batch is staged in page-locked
(pinned) host memory when onnxruntime can allocate it, so the host-to-device copy is a
DMA of a quarter of what float32 would be, and the outputs are bound to host memory
(pinned where possible) so ORT writes them there directly.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class Device:
    kind: str          # "cpu" or "cuda"
    index: int = 0

    def __str__(self) -> str:
        return self.kind if self.kind == "cpu" else f"cuda:{self.index}"


def parse_device(text: str) -> Device:
    """``cpu``, ``cuda`` or ``cuda:N``; ValueError otherwise."""
    value = text.strip().lower()
    if value == "cpu":
        return Device("cpu")
    if value == "cuda":
        return Device("cuda", 0)
    if value.startswith("cuda:") and value[5:].isdigit():
        return Device("cuda", int(value[5:]))
    raise ValueError(f"device must be cpu, cuda or cuda:N, not {text!r}")


@dataclass(frozen=True)
class Placement:
    providers: list[Any]        # what InferenceSession(providers=...) takes
    device: Device              # where the model really runs
    warning: str = ""           # why it is not where it was asked to be ("" when it is)


def select_providers(requested: Device, model_wants_gpu: bool, available: Sequence[str], model: str) -> Placement:
    """The execution providers for one model, and an explanation when CUDA was wanted but is missing."""
    wants_cuda = requested.kind == "cuda" or model_wants_gpu
    if not wants_cuda:
        return Placement([CPU], Device("cpu"))
    device = requested if requested.kind == "cuda" else Device("cuda", 0)
    if CUDA in available:
        return Placement([(CUDA, {"device_id": device.index}), CPU], device)
    why = f"--device {requested}" if requested.kind == "cuda" else "its config.pbtxt (KIND_GPU)"
    return Placement([CPU], Device("cpu"), warning=(
        f"model {model}: {why} asks for CUDA but onnxruntime here has no CUDAExecutionProvider "
        f"(available: {', '.join(available) or 'none'}); running on the CPU. Install onnxruntime-gpu "
        f"(pip install 'imgserve[gpu]') on a node with a CUDA GPU."))


class IoBoundRunner:
    """Runs a CUDA session through I/O binding, staging inputs in pinned host memory where possible."""

    def __init__(self, session: Any, input_name: str, output_names: Sequence[str], device: Device) -> None:
        self.session = session
        self.input_name = input_name
        self.output_names = list(output_names)
        self.device = device
        self.pinned = True                    # until onnxruntime refuses to allocate pinned memory
        self._local = threading.local()       # staging buffers per thread (calls may run concurrently)

    def _staging(self, batch: np.ndarray) -> Any | None:
        """A pinned OrtValue holding ``batch`` (reused per shape), or None when pinning is unavailable."""
        if not self.pinned:
            return None
        import onnxruntime as ort

        buffers: dict[tuple[int, ...], Any] = self._local.__dict__.setdefault("buffers", {})
        value = buffers.get(batch.shape)
        try:
            if value is None:
                value = ort.OrtValue.ortvalue_from_shape_and_type(list(batch.shape), batch.dtype, "cuda_pinned",
                                                                  self.device.index)
                buffers[batch.shape] = value
            value.update_inplace(batch)
        except Exception as exc:  # an onnxruntime without pinned allocators: plain host memory
            log.warning("onnxruntime cannot stage inputs in pinned memory (%s); using pageable memory", exc)
            self.pinned = False
            return None
        return value

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        binding = self.session.io_binding()
        staged = self._staging(batch)
        if staged is None:
            binding.bind_cpu_input(self.input_name, batch)
        else:
            binding.bind_ortvalue_input(self.input_name, staged)
        for name in self.output_names:
            binding.bind_output(name, "cuda_pinned" if self.pinned else "cpu", self.device.index)
        self.session.run_with_iobinding(binding)
        return [np.asarray(v) for v in binding.copy_outputs_to_cpu()]
