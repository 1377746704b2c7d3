"""Export a registry model to ONNX in the serving contract, check it, and add it to a repository.

The graph the gateway runs takes raw pixels: input ``image`` uint8
[N, C, C, channels] (NHWC, what a decoded and cropped image is), and does
everything else itself: cast to float, optional black padding (LeNet's
28 -> 32), per-channel normalization with the registry's mean/std, the network
and a softmax, giving output ``probabilities`` float32 [N, num_classes]. Keeping
preprocessing inside the graph means Triton and the embedded backend need no
model-specific code, and training and serving cannot drift apart.
"""
from __future__ import annotations

import copy
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

if TYPE_CHECKING:
    from export.fp16 import Fp16Parity
import torch.nn.functional as F
from torch import nn

from export.models import ModelEntry
from serving.repository import MODEL_FILE, ModelSpec, Preprocess, next_version, write_model

INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
OPSET = 17
PARITY_ATOL = 1e-4


class ExportError(RuntimeError):
    """The exported graph is not faithful to the PyTorch model (or could not be built)."""


class ServingGraph(nn.Module):
    """uint8 NHWC pixels -> softmax probabilities, wrapping a network trained on normalized NCHW floats.

    Padding is applied to the [0, 1] image with 0 (black) *before*
    normalization, which is what training does (see MnistDataset), so the
    padded border gets the normalized value of a black pixel.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], *, channels: int,
                 crop: int, pad_to: int | None = None) -> None:
        super().__init__()
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std need {channels} values each, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.model = model
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, channels, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, channels, 1, 1)
        # (x/255 - mean)/std folded into one multiply-add.
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", -mean_t / std_t)
        self.pad: tuple[int, int, int, int] | None = None
        if pad_to is not None and pad_to != crop:
            margin = pad_to - crop
            if margin < 0:
                raise ValueError(f"crop {crop} is larger than the network input {pad_to}")
            before = margin // 2
            self.pad = (before, margin - before, before, margin - before)  # left, right, top, bottom

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).to(torch.float32)
        if self.pad is not None:
            x = F.pad(x, self.pad, mode="constant", value=0.0)
        return self.model(x * self.scale + self.shift)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(image), dim=1)


@dataclass(frozen=True)
class ExportResult:
    """Where the export went and how faithful it is."""

    path: Path
    version: int
    parity_max_abs_diff: float
    seconds: float
    spec: ModelSpec
    parity_logits_max_rel_diff: float
    export_seconds: float
    parity_seconds: float
    fp16: Fp16Parity | None = None   # set when exported with FP16 weights (export/fp16.py)


def _resolve_sizes(entry: ModelEntry, resize: int | None, crop: int | None) -> tuple[int, int]:
    """resize/crop override the registry; a crop alone keeps the registry's resize:crop ratio."""
    if crop is None:
        crop = entry.crop
        if resize is None:
            resize = entry.resize
    if resize is None:
        resize = max(crop, round(crop * entry.resize / entry.crop))
    Preprocess(resize=resize, crop=crop, channels=entry.channels)  # validates, raising RepositoryError
    if entry.pad_to is not None and crop > entry.pad_to:
        raise ValueError(f"{entry.name}: crop {crop} exceeds the network input {entry.pad_to}")
    return resize, crop


def build_serving_graph(model: nn.Module, entry: ModelEntry, crop: int | None = None) -> ServingGraph:
    """The nn.Module that export_onnx traces (eval mode, on the CPU)."""
    crop = entry.crop if crop is None else crop
    return ServingGraph(model, entry.mean, entry.std, channels=entry.channels, crop=crop, pad_to=entry.pad_to).eval()


def export_onnx(graph: ServingGraph, path: Path, *, crop: int, channels: int, example_batch: int = 2,
                check: bool = True, output_names: Sequence[str] = (OUTPUT_NAME,)) -> Path:
    """Trace ``graph`` into an ONNX file with a dynamic batch axis (TorchScript exporter, opset 17).

    ``check`` runs the ONNX checker on the file (check_parity does so too, so callers that run it can skip this).
    ``output_names`` name the graph's outputs in order (detectors and segmenters have several).
    """
    if example_batch < 2:
        raise ValueError("example_batch must be >= 2 so the exporter cannot specialise the batch axis to 1")
    example = torch.zeros(example_batch, crop, crop, channels, dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter notes it cannot fold reversed-step Slices (from F.pad); harmless.
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        torch.onnx.export(
            graph, (example,), str(path),
            input_names=[INPUT_NAME], output_names=list(output_names),
            dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in output_names}},
            opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    if check:
        import onnx

        onnx.checker.check_model(str(path))
    return path


def onnx_session(source: Path | bytes, *, threads: int | None = None) -> "onnxruntime.InferenceSession":  # noqa: F821
    """A CPU onnxruntime session limited to torch's thread count (the machine is shared)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(source if isinstance(source, bytes) else str(source), sess_options=opts,
                                providers=["CPUExecutionProvider"])


def _with_logits_output(onnx_path: Path) -> tuple[bytes, str]:
    """The (checked) model with the softmax input exposed as a second output, for a parity check on logits.

    Probabilities of a randomly initialised deep net are often saturated
    (one-hot), where comparing them alone would prove little; the file that
    gets served keeps its single output.
    """
    import onnx

    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto)
    softmax = [n for n in proto.graph.node if n.op_type == "Softmax" and OUTPUT_NAME in n.output]
    if len(softmax) != 1:
        raise ExportError(f"expected one Softmax producing {OUTPUT_NAME!r} in the exported graph")
    logits_name = softmax[0].input[0]
    proto.graph.output.append(onnx.helper.make_tensor_value_info(logits_name, onnx.TensorProto.FLOAT, None))
    return proto.SerializeToString(), logits_name


@dataclass(frozen=True)
class Parity:
    """onnxruntime vs PyTorch on one random batch."""

    max_abs_diff: float        # on the probabilities
    logits_max_rel_diff: float  # max |diff| over the logits, relative to max(1, max |logit|)


def check_parity(graph: ServingGraph, onnx_path: Path, *, crop: int, channels: int, batch: int = 3,
                 seed: int = 0, atol: float = PARITY_ATOL) -> Parity:
    """Compare onnxruntime with PyTorch on a random uint8 batch; raise ExportError if they disagree.

    Probabilities must agree within ``atol`` absolutely, logits within ``atol``
    relative to their scale. ``batch`` differs from the export example's so
    the dynamic batch axis is exercised too.
    """
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(batch, crop, crop, channels), dtype=np.uint8)
    with torch.no_grad():
        x = torch.from_numpy(images)
        expected = graph(x).numpy()
        logits_expected = graph.logits(x).numpy()
    model_bytes, logits_name = _with_logits_output(onnx_path)
    got, logits_got = onnx_session(model_bytes).run([OUTPUT_NAME, logits_name], {INPUT_NAME: images})
    if got.shape != expected.shape or got.dtype != np.float32:
        raise ExportError(f"onnxruntime gave {got.dtype} {got.shape}, PyTorch {expected.dtype} {expected.shape}")
    diff = float(np.max(np.abs(got - expected)))
    scale = max(1.0, float(np.max(np.abs(logits_expected))))
    rel = float(np.max(np.abs(logits_got - logits_expected))) / scale
    if not (np.isfinite(diff) and np.isfinite(rel)) or diff > atol or rel > atol:
        raise ExportError(f"ONNX parity failed: probabilities max abs diff {diff:.3g}, "
                          f"logits max rel diff {rel:.3g} (limit {atol:g})")
    return Parity(max_abs_diff=diff, logits_max_rel_diff=rel)


def export_to_repository(model: nn.Module, entry: ModelEntry, repo: Path, name: str, labels: Sequence[str], *,
                         gpu: bool = False, ten_crop_default: bool | None = None, resize: int | None = None,
                         crop: int | None = None, max_batch_size: int = 32, max_queue_delay_us: int = 2000,
                         preferred_batch_sizes: Sequence[int] = (), instance_count: int = 1,
                         description: str = "", atol: float = PARITY_ATOL, fp16: bool = False,
                         tensorrt: bool = False) -> ExportResult:
    """Export ``model`` (weights as they are) as a new version of ``name`` in ``repo``.

    The export is checked against PyTorch before anything is written, and a
    new version directory is always created (served versions are never
    overwritten). ``gpu`` only selects the Triton instance kind; the export
    itself runs on the CPU so parity is measured without TF32/cuDNN noise.
    ``fp16`` stores FP16 weights (uint8 in, FP32 out, checked against the FP32 graph);
    ``tensorrt`` (with ``gpu``) asks Triton for its TensorRT accelerator at FP16.
    """
    if tensorrt and not gpu:
        raise ValueError("tensorrt needs gpu: TensorRT runs only on KIND_GPU instances")
    start = time.perf_counter()
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid model name {name!r}")
    labels = tuple(str(label) for label in labels)
    if any(not label.strip() or "\n" in label for label in labels):
        raise ValueError("labels must be non-empty single-line strings")
    resize, crop = _resolve_sizes(entry, resize, crop)
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")

    was_training = model.training
    cpu_model = model if all(p.device.type == "cpu" for p in model.parameters()) else copy.deepcopy(model).cpu()
    graph = build_serving_graph(cpu_model, entry, crop)
    try:
        with torch.no_grad():
            probe = graph(torch.zeros(2, crop, crop, entry.channels, dtype=torch.uint8))
        if probe.shape != (2, len(labels)):
            raise ValueError(f"{entry.name} outputs {tuple(probe.shape[1:])} classes but {len(labels)} labels were given")
        with tempfile.TemporaryDirectory(prefix="imgserve-export-") as tmp:
            onnx_path = Path(tmp) / MODEL_FILE
            t0 = time.perf_counter()
            export_onnx(graph, onnx_path, crop=crop, channels=entry.channels, check=False)
            export_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            parity = check_parity(graph, onnx_path, crop=crop, channels=entry.channels, atol=atol)
            half = None
            if fp16:
                from export.fp16 import Fp16ParityError, make_fp16

                try:
                    half = make_fp16(onnx_path, crop=crop, channels=entry.channels)
                except Fp16ParityError as exc:
                    raise ExportError(str(exc)) from None
            parity_seconds = time.perf_counter() - t0
            spec = ModelSpec(
                name=name,
                version=next_version(Path(repo) / name),
                preprocess=Preprocess(resize=resize, crop=crop, channels=entry.channels,
                                      ten_crop_default=entry.ten_crop_default if ten_crop_default is None
                                      else ten_crop_default),
                labels=labels,
                task=entry.task,
                max_batch_size=max_batch_size,
                input_name=INPUT_NAME,
                output_name=OUTPUT_NAME,
                max_queue_delay_us=max_queue_delay_us,
                preferred_batch_sizes=tuple(preferred_batch_sizes),
                gpu=gpu,
                instance_count=instance_count,
                description=description or f"{entry.name}, {len(labels)} classes",
                extra={"architecture": entry.name, "opset": str(OPSET), **({"precision": "fp16"} if fp16 else {})},
                accelerator="tensorrt" if tensorrt else "",
            )
            Path(repo).mkdir(parents=True, exist_ok=True)
            target = write_model(Path(repo), spec, onnx_path)
    finally:
        model.train(was_training)
    version = int(target.parent.name)
    return ExportResult(path=target, version=version, parity_max_abs_diff=parity.max_abs_diff,
                        parity_logits_max_rel_diff=parity.logits_max_rel_diff,
                        seconds=time.perf_counter() - start,
                        spec=replace(spec, version=version),
                        export_seconds=export_seconds, parity_seconds=parity_seconds, fp16=half)
