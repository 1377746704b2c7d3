"""Export detectors and segmenters to the serving contract, checked for parity and batch invariance.

Both graphs take ``image`` uint8 [N, S, S, 3] (NHWC, letterboxed, dynamic N) and normalise inside
the graph like the classifiers' (export/onnx_export.py's ServingGraph).

* Detector (TensorRT EfficientNMS layout, decoded in the graph by export.centernet.decode):
  ``num_detections`` INT32 [N, 1], ``detection_boxes`` FP32 [N, K, 4] (x1 y1 x2 y2, model-input
  pixels), ``detection_scores`` FP32 [N, K] (descending), ``detection_classes`` INT32 [N, K]
  (0-based into labels.txt); rows from num_detections on are zero.
* Segmenter: ``labels`` UINT8 [N, S, S] (argmax in the graph) and ``probabilities`` FP32
  [N, C, S, S] (softmax; the gateway flips and resizes it), labels.txt starting with background.

Before anything is written, onnxruntime must agree with PyTorch (detector boxes within 1e-3 px and
the same detections, classes and scores within SCORE_ATOL, except those within SCORE_ATOL of the
reporting floor or of the K-th score; segmenter masks identical except at
near-ties within TIE_MARGIN, probabilities within PROB_ATOL) on sample images, and each image must
give the same answer alone (batch 1) as inside a batch of 8.
"""
from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from export.centernet import SCORE_FLOOR, decode
from export.models import ModelEntry
from export.onnx_export import INPUT_NAME, OPSET, ExportError, ServingGraph, export_onnx, onnx_session
from serving.repository import MODEL_FILE, ModelSpec, Preprocess, TensorSpec, next_version, write_model

DETECTION_OUTPUTS = ("num_detections", "detection_boxes", "detection_scores", "detection_classes")
SEGMENTATION_OUTPUTS = ("labels", "probabilities")
BOX_ATOL = 1e-3      # pixels
# Scores are sigmoids; on trained toy detectors PyTorch and onnxruntime differed by up to 9.9e-5, so
# 1e-4 had no headroom. 1e-3 moves no ranking or threshold that matters.
SCORE_ATOL = 1e-3
# Probabilities are compared absolutely; 1e-4 failed on a float32 U-Net (6e-4 between PyTorch's oneDNN
# and onnxruntime's MLAS convolutions, which sum in other orders). 2e-3 is still far below anything that
# moves a served mask or a flip-averaged probability.
PROB_ATOL = 2e-3
# A pixel whose two most probable classes are closer than this is a tie that two correct engines may
# break either way; it is reported, not failed (at most MAX_TIE_FRACTION of the pixels).
TIE_MARGIN = 2 * PROB_ATOL
MAX_TIE_FRACTION = 1e-3
INVARIANCE_BATCH = 8
DEFAULT_SCORE_THRESHOLD = 0.3
DEFAULT_MAX_DETECTIONS = 100


class DetectionGraph(ServingGraph):
    """uint8 NHWC -> the four EfficientNMS-layout outputs (see the module docstring)."""

    def __init__(self, model: nn.Module, entry: ModelEntry, *, size: int, k: int = DEFAULT_MAX_DETECTIONS,
                 floor: float = SCORE_FLOOR) -> None:
        super().__init__(model, entry.mean, entry.std, channels=entry.channels, crop=size)
        self.size, self.k, self.floor, self.stride = size, k, floor, int(getattr(model, "stride"))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        heat, ltrb = self.logits(image)
        return decode(heat, ltrb, k=self.k, stride=self.stride, input_size=self.size, floor=self.floor)


class SegmentationGraph(ServingGraph):
    """uint8 NHWC -> (labels uint8 [N, S, S], probabilities float32 [N, C, S, S])."""

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        logits = self.logits(image).float()
        return torch.argmax(logits, dim=1).to(torch.uint8), torch.softmax(logits, dim=1)


def detection_outputs(num_classes: int, k: int) -> tuple[TensorSpec, ...]:
    del num_classes  # classes are indices into labels.txt; the dims do not depend on them
    return (TensorSpec("num_detections", "INT32", (1,)), TensorSpec("detection_boxes", "FP32", (k, 4)),
            TensorSpec("detection_scores", "FP32", (k,)), TensorSpec("detection_classes", "INT32", (k,)))


def segmentation_outputs(num_classes: int, size: int) -> tuple[TensorSpec, ...]:
    return (TensorSpec("labels", "UINT8", (size, size)), TensorSpec("probabilities", "FP32", (num_classes, size, size)))


# ------------------------------------------------------------------ checks

def _matches(num: np.ndarray, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, i: int,
             klass: int, score: float) -> np.ndarray:
    """Rows of image ``i`` of one output with class ``klass`` and a score within SCORE_ATOL of ``score``."""
    n = int(num[i, 0])
    return np.flatnonzero((classes[i, :n] == klass) & (np.abs(scores[i, :n] - score) <= SCORE_ATOL))


def _decided_cutoff(a: Sequence[np.ndarray], b: Sequence[np.ndarray], i: int, floor: float) -> float:
    """The score from which both outputs must hold a detection of image ``i``.

    Below it a detection may be in one output and not the other without either being wrong: it sits
    within SCORE_ATOL of the reporting floor, or of the K-th score when the top-K is full.
    """
    cutoff = floor + SCORE_ATOL
    for num, scores in ((a[0], a[2]), (b[0], b[2])):
        n, k = int(num[i, 0]), scores.shape[1]
        if n == k:
            cutoff = max(cutoff, float(scores[i, k - 1]) + 2 * SCORE_ATOL)
    return cutoff


def _compare_detections(a: Sequence[np.ndarray], b: Sequence[np.ndarray], floor: float = SCORE_FLOOR
                        ) -> tuple[float, float]:
    """Max box and score differences between two detector outputs; raises if they disagree on a detection.

    Detections are matched by class and score within each image rather than by row, so two nearly equal
    scores that trade places between runtimes are not a failure. Every detection scoring at least
    ``_decided_cutoff`` in either output needs a counterpart in the other; one nearer the floor (or the
    K-th score) than SCORE_ATOL may be missing from one side, since engines that sum in other orders
    legitimately put it on either side of the cut.
    """
    box_diff = score_diff = 0.0
    for i in range(len(a[0])):
        cutoff = _decided_cutoff(a, b, i, floor)
        for this, other, side in ((a, b, "first"), (b, a, "second")):
            num, boxes, scores, classes = this
            for j in range(int(num[i, 0])):
                if scores[i, j] < cutoff:
                    continue
                same = _matches(*other, i, int(classes[i, j]), float(scores[i, j]))
                if same.size == 0:
                    raise ExportError(f"image {i}: detection {j} of the {side} output (class {classes[i, j]}, "
                                      f"score {scores[i, j]:.6f}) has no counterpart within {SCORE_ATOL:g}")
                diffs = np.abs(other[1][i, same] - boxes[i, j]).max(axis=1)
                best = int(same[np.argmin(diffs)])
                box_diff = max(box_diff, float(diffs.min()))
                score_diff = max(score_diff, float(abs(other[2][i, best] - scores[i, j])))
            n = int(num[i, 0])
            for out in (boxes, scores, classes):
                if np.any(out[i, n:] != 0):
                    raise ExportError(f"image {i}: rows from num_detections ({n}) on are not zero")
    return box_diff, score_diff


@dataclass(frozen=True)
class MaskComparison:
    pixels: int           # label pixels compared
    decided_differ: int   # pixels labelled differently where ``a`` is not a tie: always a failure
    ties_differ: int      # pixels labelled differently where ``a``'s top two are within TIE_MARGIN
    max_prob_diff: float

    def failure(self) -> str | None:
        if self.decided_differ:
            return f"{self.decided_differ} mask pixels differ"
        if self.ties_differ > MAX_TIE_FRACTION * self.pixels:
            return f"{self.ties_differ} near-tie mask pixels differ (limit {MAX_TIE_FRACTION:g} of {self.pixels})"
        if self.max_prob_diff > PROB_ATOL:
            return f"probabilities differ by {self.max_prob_diff:.3g} (limit {PROB_ATOL:g})"
        return None


def _compare_masks(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> MaskComparison:
    """How two segmenter outputs (labels, probabilities) differ, taking ``a`` as the reference."""
    differ = a[0] != b[0]
    top2 = np.sort(a[1], axis=1)[:, -2:]
    tie = (top2[:, 1] - top2[:, 0]) < TIE_MARGIN
    return MaskComparison(int(differ.size), int(np.count_nonzero(differ & ~tie)), int(np.count_nonzero(differ & tie)),
                          float(np.max(np.abs(a[1] - b[1]))))


def _three_runs(graph: ServingGraph, onnx_path: Path, images: np.ndarray, names: Sequence[str]
               ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(the first 8 images, PyTorch's outputs, onnxruntime's on them as one batch, and as batches of one)."""
    images = np.ascontiguousarray(images[:INVARIANCE_BATCH])
    with torch.no_grad():
        expected = [t.numpy() for t in graph(torch.from_numpy(images))]
    session = onnx_session(onnx_path)
    batched = session.run(list(names), {INPUT_NAME: images})
    alone = [session.run(list(names), {INPUT_NAME: images[i:i + 1]}) for i in range(len(images))]
    return images, expected, batched, [np.concatenate([r[k] for r in alone]) for k in range(len(names))]


@dataclass(frozen=True)
class DenseParity:
    """What the checks measured (all must be within limits for an export to be written)."""

    images: int
    detections: int            # detections above the floor in the sample (detector); 0 for segmenters
    max_box_diff: float        # px, PyTorch vs onnxruntime (detector)
    max_score_diff: float
    mask_pixels_differ: int    # PyTorch vs onnxruntime (segmenter), where PyTorch's mask is not a near-tie
    max_prob_diff: float
    batch_max_diff: float      # batch of 8 vs batch 1 (boxes for detectors, probabilities for segmenters)
    batch_mask_pixels_differ: int
    tie_pixels_differ: int = 0  # near-tie pixels (top two within TIE_MARGIN) labelled differently, both checks

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items()}


def sample_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """Random uint8 images when no real sample is given (a trained model may detect nothing in them)."""
    return np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


def check_detector(graph: DetectionGraph, onnx_path: Path, images: np.ndarray) -> DenseParity:
    """PyTorch vs onnxruntime, and batch of 8 vs batch 1, on ``images`` (uint8 [n >= 8, S, S, 3])."""
    images, expected, batched, alone = _three_runs(graph, onnx_path, images, DETECTION_OUTPUTS)
    box_diff, score_diff = _compare_detections(expected, batched, graph.floor)  # scores match within SCORE_ATOL
    if box_diff > BOX_ATOL:
        raise ExportError(f"detector parity failed: boxes differ by {box_diff:.3g} px (limit {BOX_ATOL}), "
                          f"scores by {score_diff:.3g}")
    batch_box, _ = _compare_detections(batched, alone, graph.floor)
    if batch_box > BOX_ATOL:
        raise ExportError(f"detector is not batch invariant: boxes differ by {batch_box:.3g} px between batch "
                          f"{len(images)} and batch 1")
    return DenseParity(len(images), int(batched[0].sum()), box_diff, score_diff, 0, 0.0, batch_box, 0)


def check_segmenter(graph: SegmentationGraph, onnx_path: Path, images: np.ndarray) -> DenseParity:
    """PyTorch vs onnxruntime, and batch of 8 vs batch 1: identical masks except at near-ties.

    A pixel whose two most probable classes are within TIE_MARGIN may go either way between engines
    that sum in different orders; such pixels are counted and allowed up to MAX_TIE_FRACTION.
    """
    images, expected, batched, alone = _three_runs(graph, onnx_path, images, SEGMENTATION_OUTPUTS)
    parity, batch = _compare_masks(expected, batched), _compare_masks(batched, alone)
    if (why := parity.failure()) is not None:
        raise ExportError(f"segmenter parity failed (PyTorch vs onnxruntime): {why}")
    if (why := batch.failure()) is not None:
        raise ExportError(f"segmenter is not batch invariant (batch {len(images)} vs batch 1): {why}")
    return DenseParity(len(images), 0, 0.0, 0.0, parity.decided_differ, parity.max_prob_diff, batch.max_prob_diff,
                       batch.decided_differ, parity.ties_differ + batch.ties_differ)


def check_output_types(onnx_path: Path, outputs: Sequence[TensorSpec], images: np.ndarray) -> None:
    """The file's outputs have exactly the datatypes and per-item dims the repository config will declare."""
    session = onnx_session(onnx_path)
    got = session.run([o.name for o in outputs], {INPUT_NAME: np.ascontiguousarray(images[:2])})
    for spec, value in zip(outputs, got):
        if value.dtype != spec.numpy_dtype or tuple(value.shape[1:]) != spec.dims:
            raise ExportError(f"output {spec.name!r} is {value.dtype} {tuple(value.shape[1:])}, the config says "
                              f"{spec.datatype} {spec.dims}")


# ------------------------------------------------------------------ export

@dataclass(frozen=True)
class DenseExportResult:
    path: Path
    version: int
    spec: ModelSpec
    parity: DenseParity
    seconds: float


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).float().cpu().eval()


def export_dense_to_repository(model: nn.Module, entry: ModelEntry, repo: Path, name: str, labels: Sequence[str], *,
                               size: int | None = None, images: np.ndarray | None = None,
                               max_detections: int = DEFAULT_MAX_DETECTIONS,
                               score_threshold: float = DEFAULT_SCORE_THRESHOLD, gpu: bool = False,
                               max_batch_size: int = 32, description: str = "") -> DenseExportResult:
    """Export a detector or segmenter (by ``entry.task``) as a new version of ``name`` in ``repo``.

    ``images`` (uint8 [>= 8, S, S, 3], letterboxed like serving) are what parity and batch invariance are
    checked on; give real ones for a trained detector, whose random-noise outputs are empty.
    """
    start = time.perf_counter()
    if entry.task not in ("detection", "segmentation"):
        raise ValueError(f"{entry.name} is a {entry.task} model; use export.onnx_export for classifiers")
    size = size or entry.crop
    labels = tuple(str(x) for x in labels)
    graph: ServingGraph
    if entry.task == "detection":
        graph = DetectionGraph(_cpu_eval_copy(model), entry, size=size, k=max_detections).eval()
        names, outputs = DETECTION_OUTPUTS, detection_outputs(len(labels), max_detections)
        extra = {"score_threshold": f"{score_threshold:g}", "score_floor": f"{SCORE_FLOOR:g}"}
    else:
        graph = SegmentationGraph(_cpu_eval_copy(model), entry.mean, entry.std, channels=entry.channels, crop=size).eval()
        names, outputs = SEGMENTATION_OUTPUTS, segmentation_outputs(len(labels), size)
        extra = {}
    if images is None:
        images = sample_images(INVARIANCE_BATCH, size)
    if images.shape[0] < INVARIANCE_BATCH or images.shape[1:] != (size, size, entry.channels):
        raise ValueError(f"need >= {INVARIANCE_BATCH} sample images of {size}x{size}x{entry.channels}, "
                         f"got {images.shape}")
    with tempfile.TemporaryDirectory(prefix="imgserve-export-") as tmp:
        onnx_path = Path(tmp) / MODEL_FILE
        export_onnx(graph, onnx_path, crop=size, channels=entry.channels, output_names=names)
        if entry.task == "detection":
            parity = check_detector(graph, onnx_path, images)  # type: ignore[arg-type]
        else:
            parity = check_segmenter(graph, onnx_path, images)  # type: ignore[arg-type]
        check_output_types(onnx_path, outputs, images)
        spec = ModelSpec(
            name=name, version=next_version(Path(repo) / name),
            preprocess=Preprocess(resize=size, crop=size, channels=entry.channels, geometry="letterbox"),
            labels=labels, task=entry.task, max_batch_size=max_batch_size, input_name=INPUT_NAME,
            output_name=names[0], outputs=outputs, gpu=gpu,
            description=description or f"{entry.name}, {len(labels)} classes",
            extra={"architecture": entry.name, "opset": str(OPSET), **extra})
        Path(repo).mkdir(parents=True, exist_ok=True)
        target = write_model(Path(repo), spec, onnx_path)
    version = int(target.parent.name)
    return DenseExportResult(path=target, version=version, spec=spec, parity=parity,
                             seconds=time.perf_counter() - start)
