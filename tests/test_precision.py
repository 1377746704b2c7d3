"""export/precision.py: what ``--amp`` resolves to on which hardware, and what the autocast contexts cast."""
from __future__ import annotations

import pytest
import torch

from export import precision


def test_native_bf16_is_read_from_the_cpu_flags() -> None:
    assert precision.cpu_has_native_bf16("processor : 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n")
    assert precision.cpu_has_native_bf16("flags : fpu avx512f avx512_bf16\n")             # AMD Zen 4
    assert not precision.cpu_has_native_bf16("flags : fpu sse avx2 avx512f avx512bw\n")   # emulated: slower
    assert not precision.cpu_has_native_bf16("model name : amx_bf16 in a name, not a flag\n")


def test_auto_follows_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    for native, expected in ((True, "bf16"), (False, "off")):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda native=native: native)
        assert precision.resolve_amp("auto", cpu) == expected
        assert precision.resolve_amp("auto", cpu, cuda_auto="bf16") == expected  # the dense recipes' auto
        for mode in ("off", "bf16", "fp16"):
            assert precision.resolve_amp(mode, cpu) == mode  # explicit modes are kept (train.py warns on fp16)
    cuda = torch.device("cuda")
    assert precision.resolve_amp("auto", cuda) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert precision.resolve_amp("auto", cuda, cuda_auto="bf16") == "off"  # no float16 without loss scaling
    with pytest.raises(ValueError, match="amp must be one of"):
        precision.resolve_amp("fp8", cpu)


def test_bf16_autocast_casts_the_convolutions_and_nothing_else() -> None:
    conv = torch.nn.Conv2d(3, 4, 3)
    x = torch.randn(1, 3, 8, 8)
    with precision.autocast(torch.device("cpu"), "bf16"):
        y = conv(x)
        z = x * 2
        loss = torch.nn.functional.cross_entropy(y.mean(dim=(2, 3)), torch.tensor([1]))
    assert y.dtype == torch.bfloat16 and z.dtype == torch.float32 and conv.weight.dtype == torch.float32
    assert loss.dtype == torch.float32  # the classifier's loss inside the context stays float32
    with precision.autocast(torch.device("cpu"), "off"):
        assert conv(x).dtype == torch.float32
    with pytest.raises(ValueError, match="fp16 autocast needs CUDA"):
        precision.autocast(torch.device("cpu"), "fp16")
    with pytest.raises(ValueError, match="amp"):
        precision.autocast(torch.device("cpu"), "fp8")
