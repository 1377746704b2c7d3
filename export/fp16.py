"""FP16 weights with FP32 (here: uint8 in, float32 out) I/O, checked against the FP32 model.

Why: on a GPU, FP16 halves weight memory and bandwidth and runs on tensor cores; the
serving contract (uint8 NHWC in, float32 probabilities out) must not change, so the
conversion keeps the graph's inputs and outputs in their types (``keep_io_types``) and
only the inside runs in half precision. FP16 changes numbers, so the converted model is
compared with the FP32 one on seeded random images before it is written: the top-1 class
must agree on (almost) every image and no probability may move more than a tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Tolerances of the FP16 parity check (FP16 carries ~3 significant decimal digits).
FP16_PROB_ATOL = 0.02
FP16_MIN_TOP1_AGREEMENT = 0.95
PARITY_IMAGES = 32


class Fp16ParityError(ValueError):
    """The FP16 model disagrees with the FP32 one beyond the tolerances."""


@dataclass(frozen=True)
class Fp16Parity:
    top1_agreement: float          # fraction of images with the same top-1 class
    max_abs_prob_diff: float       # largest |p16 - p32| over every class of every image
    images: int


def convert_to_fp16(source: Path, target: Path) -> None:
    """Write ``source`` with FP16 weights and internals, its I/O types kept, to ``target``."""
    import warnings

    import onnx
    from onnxconverter_common import float16

    model = onnx.load(str(source))
    # Our graphs start with Cast(uint8 -> float): the converter retypes its output but not its
    # ``to`` attribute. Keeping Cast nodes in FP32 (the converter then inserts an FP32 -> FP16
    # cast after each) is its own, correct way round that.
    with warnings.catch_warnings():  # one warning per weight below FP16's range (it flushes them to ~0)
        warnings.simplefilter("ignore", UserWarning)
        half = float16.convert_float_to_float16(model, keep_io_types=True,
                                                op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + ["Cast"])
    onnx.checker.check_model(half)
    onnx.save(half, str(target))


def _run(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = [o.name for o in session.get_outputs()][:1]
    return np.asarray(session.run([output], {session.get_inputs()[0].name: images})[0], dtype=np.float32)


def check_fp16_parity(fp32: Path, fp16: Path, *, crop: int, channels: int, images: int = PARITY_IMAGES,
                      seed: int = 0, prob_atol: float = FP16_PROB_ATOL,
                      min_top1: float = FP16_MIN_TOP1_AGREEMENT) -> Fp16Parity:
    """Compare the two models' probabilities on seeded random uint8 images; raise when they part."""
    batch = np.random.default_rng(seed).integers(0, 256, size=(images, crop, crop, channels), dtype=np.uint8)
    p32, p16 = _run(fp32, batch), _run(fp16, batch)
    if p16.dtype != np.float32 or p16.shape != p32.shape:
        raise Fp16ParityError(f"FP16 model answers {p16.dtype} {p16.shape}, the FP32 one {p32.dtype} {p32.shape}")
    agreement = float(np.mean(p32.argmax(axis=1) == p16.argmax(axis=1)))
    diff = float(np.max(np.abs(p32 - p16)))
    parity = Fp16Parity(top1_agreement=agreement, max_abs_prob_diff=diff, images=images)
    if agreement < min_top1 or diff > prob_atol:
        raise Fp16ParityError(f"FP16 parity failed: top-1 agreement {agreement:.3f} (need >= {min_top1}), "
                              f"max |p16 - p32| {diff:.3g} (limit {prob_atol})")
    return parity


def make_fp16(onnx_path: Path, *, crop: int, channels: int) -> Fp16Parity:
    """Replace the FP32 file at ``onnx_path`` with its checked FP16 version."""
    half = onnx_path.with_name(onnx_path.stem + ".fp16.onnx")
    convert_to_fp16(onnx_path, half)
    parity = check_fp16_parity(onnx_path, half, crop=crop, channels=channels)
    half.replace(onnx_path)
    return parity
