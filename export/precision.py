"""Training precision for every trainer: which autocast a run uses and the context that applies it.

Why one module: the classifier trainer (export/train.py through export/engine.py) and the dense
recipes (export/recipes/common.py) pick precision the same way, and the default repository's build
asks both for ``auto``, which must mean the same thing in each.

Modes:
* ``off``: float32.
* ``bf16``: autocast the forward pass to bfloat16 (convolutions and matmuls; accumulation, weights,
  gradients and optimizer state stay float32). bfloat16 has float32's exponent range, so no loss
  scaling. Fast where the hardware computes bfloat16 natively; elsewhere oneDNN emulates it and
  training gets slower.
* ``fp16``: float16 autocast with loss scaling (a ``torch.amp.GradScaler``), on CUDA only.
* ``auto``: on CUDA, ``fp16`` (tensor cores on every generation); on a CPU, ``bf16`` where it has
  Intel AMX or AVX512-BF16 (AMD Zen 4 has the latter), else ``off``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

AMP_MODES = ("off", "bf16", "fp16", "auto")
_NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes bfloat16 in hardware (Intel AMX or AVX512-BF16; AMD Zen 4 has the latter).

    Elsewhere oneDNN emulates bfloat16 and autocast makes training slower, not faster.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split()}
    return any(flag in flags for flag in _NATIVE_BF16_FLAGS)


def resolve_amp(amp: str, device: torch.device, *, cuda_auto: str = "fp16") -> str:
    """The mode a run on ``device`` uses for ``amp`` (``auto`` resolved as the module docstring says).

    ``cuda_auto`` is what ``auto`` means on CUDA: the dense recipes, which do not scale their losses, ask
    for ``bf16`` (float32 on a GPU without it).
    """
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp != "auto":
        return amp
    if device.type == "cuda":
        if cuda_auto == "bf16":
            return "bf16" if torch.cuda.is_bf16_supported() else "off"
        return cuda_auto
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "off"


def autocast(device: torch.device, amp: str) -> Any:
    """The training forward's precision context for a resolved mode (``off``, ``bf16`` or ``fp16``)."""
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if amp == "fp16":
        if device.type != "cuda":
            raise ValueError("fp16 autocast needs CUDA")
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    if amp != "off":
        raise ValueError(f"amp must be 'off', 'bf16' or 'fp16' here, got {amp!r}")
    return contextlib.nullcontext()
