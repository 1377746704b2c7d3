"""Predictors: images in, results in ORIGINAL image pixels out, whatever runs the model.

The scoring code (export/evaluation/scoring.py) only sees these interfaces:

* ``DetectionPredictor.predict(images: list[bytes]) -> list[Detections]``
* ``SegmentationPredictor.predict(images: list[bytes]) -> list[uint8 [H, W] class masks]``

``LetterboxDetector`` / ``LetterboxSegmenter`` do what the gateway does around a letterbox model
(decode, letterbox to S x S with serving.preprocess, run, map back with the Letterbox record) around
any ``run(uint8 [N, S, S, 3]) -> {output name: array}`` function: onnxruntime on a repository's
model.onnx (``repository_predictor``), or the PyTorch serving graph during training. A predictor
through a running gateway implements the same ``predict`` over the SDK; the gateway maps back itself.
No torch here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
from PIL import Image

from export.evaluation.scoring import Detections
from serving.preprocess import decode, letterbox
from serving.repository import ModelSpec, read_model

RunFn = Callable[[np.ndarray], dict[str, np.ndarray]]
BATCH = 32


class DetectionPredictor(Protocol):
    def predict(self, images: list[bytes]) -> list[Detections]: ...


class SegmentationPredictor(Protocol):
    def predict(self, images: list[bytes]) -> list[np.ndarray]: ...


def _decode_all(images: Sequence[bytes], channels: int) -> list[Image.Image]:
    return [decode(data, channels=channels, index=i) for i, data in enumerate(images)]


class _Letterboxed:
    """Letterbox a list of PIL images, run them in batches, hand each image's outputs and record to ``finish``."""

    def __init__(self, run: RunFn, size: int, channels: int = 3, batch: int = BATCH) -> None:
        self.run, self.size, self.channels, self.batch = run, size, channels, batch

    def _outputs(self, images: Sequence[Image.Image]):  # type: ignore[no-untyped-def]
        for start in range(0, len(images), self.batch):
            chunk = [letterbox(img, self.size) for img in images[start:start + self.batch]]
            batch = np.stack([a if a.ndim == 3 else a[..., None] for a, _ in chunk])
            outputs = self.run(batch)
            for i, (_, record) in enumerate(chunk):
                yield {name: value[i] for name, value in outputs.items()}, record


class LetterboxDetector(_Letterboxed):
    """Detections with score >= ``score_threshold``, boxes mapped back to the original image."""

    def __init__(self, run: RunFn, size: int, *, score_threshold: float = 0.0, channels: int = 3,
                 batch: int = BATCH) -> None:
        super().__init__(run, size, channels, batch)
        self.score_threshold = score_threshold

    def predict_images(self, images: Sequence[Image.Image]) -> list[Detections]:
        results = []
        for out, record in self._outputs(images):
            n = int(out["num_detections"].reshape(-1)[0])
            scores = out["detection_scores"][:n]
            keep = scores >= self.score_threshold
            results.append(Detections(record.boxes_to_original(out["detection_boxes"][:n][keep]),
                                      scores[keep].astype(np.float32),
                                      out["detection_classes"][:n][keep].astype(np.int64)))
        return results

    def predict(self, images: list[bytes]) -> list[Detections]:
        return self.predict_images(_decode_all(images, self.channels))


class LetterboxSegmenter(_Letterboxed):
    """Class masks at the original image size, as the gateway makes them: the probabilities resized back
    (bilinear) and their argmax, which places boundaries between model pixels; a model that returns only
    ``labels`` has its mask resized back with nearest neighbours."""

    def predict_images(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        masks = []
        for out, record in self._outputs(images):
            if "probabilities" in out:
                masks.append(record.scores_to_original(out["probabilities"]).argmax(axis=0).astype(np.uint8))
            else:
                masks.append(record.mask_to_original(out["labels"]))
        return masks

    def predict(self, images: list[bytes]) -> list[np.ndarray]:
        return self.predict_images(_decode_all(images, self.channels))


def onnx_runner(onnx_path: Path, output_names: Sequence[str], input_name: str = "image", threads: int = 1) -> RunFn:
    """``run`` over an onnxruntime CPU session of one model file."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    names = list(output_names)

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {input_name: batch})))
    return run


def repository_predictor(model_dir: Path, *, score_threshold: float | None = None, threads: int = 1
                         ) -> tuple[ModelSpec, LetterboxDetector | LetterboxSegmenter]:
    """The predictor of a repository model (its served version), by its task; detectors keep scores >= threshold
    (default 0: everything the graph reports, which is what mAP wants)."""
    local = read_model(Path(model_dir))
    spec = local.spec
    if spec.preprocess.geometry != "letterbox" or spec.task not in ("detection", "segmentation"):
        raise ValueError(f"model {spec.name!r} is a {spec.task} model with {spec.preprocess.geometry} geometry; "
                         "eval scores letterbox detectors and segmenters")
    run = onnx_runner(local.onnx_path, spec.output_names, spec.input_name, threads)
    size, channels = spec.preprocess.crop, spec.preprocess.channels
    if spec.task == "detection":
        return spec, LetterboxDetector(run, size, score_threshold=score_threshold or 0.0, channels=channels)
    return spec, LetterboxSegmenter(run, size, channels)
