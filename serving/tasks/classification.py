"""Classification: resize + centre crop (or AlexNet's 10 crops), softmax averaged over crops, top-k.

Options: ``top_k`` (default: the gateway's --default-top-k, capped at the number of
classes) and ``ten_crop`` (default: the model's ``imgserve.ten_crop_default``).
On v2 the output is ``probabilities`` FP32 [N, K], or with the classification
extension BYTES [N, k] strings ``"score:index:label"`` like Triton.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from serving.errors import InvalidInput
from serving.preprocess import DecodeOptions, crops_per_image, preprocess
from serving.repository import ModelSpec, RepositoryError
from serving.tasks.base import (OptionSpec, OutputTensor, Outputs, Prepared, RequestedOutput, TaskDefaults,
                                TaskHandler, TaskResult, reject_unknown_outputs, require_outputs)


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class ClassifyOptions:
    top_k: int
    ten_crop: bool


@dataclass(frozen=True)
class ImageClasses:
    """One image's answer: the full probability row and its top-k, best first."""

    probabilities: np.ndarray  # [K] float32
    classes: list[ClassScore]


def ranked(row: np.ndarray, labels: Sequence[str], k: int) -> list[ClassScore]:
    """The k best classes, best first; ties keep the lower class index first."""
    order = np.argsort(-row, kind="stable")[:k]
    return [ClassScore(index=int(i), label=labels[i] if i < len(labels) else str(i), score=float(row[i]))
            for i in order]


def classification_strings(probabilities: np.ndarray, labels: Sequence[str], k: int) -> list[bytes]:
    """Triton-style classification results, row-major [N, k]: "score:index:label", best first.

    Scores are printed as the shortest decimal that round-trips to the float32 value,
    so a client parsing them gets exactly the probability the FP32 output carries.
    """
    k = min(k, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    out: list[bytes] = []
    for row, idx in zip(probabilities, order):
        for i in idx:
            label = labels[i] if i < len(labels) else ""
            text = f"{str(np.float32(row[i]))}:{int(i)}" + (f":{label}" if label else "")
            out.append(text.encode("utf-8"))
    return out


V2_OUTPUT = "probabilities"  # the gateway's v2 name, whatever the engine calls its output


class ClassificationHandler(TaskHandler):
    task = "classification"
    v1_method = "Classify"
    v1_request = pb.ClassifyRequest
    options = (
        OptionSpec("top_k", int, "classes returned per image, best first (> 0)"),
        OptionSpec("ten_crop", bool, "AlexNet-style 10-crop test-time averaging"),
    )

    def check_spec(self, spec: ModelSpec) -> None:
        if spec.preprocess.geometry != "crop":
            raise RepositoryError(f"model {spec.name!r}: a classifier uses the crop geometry")
        if len(spec.outputs) != 1:
            raise RepositoryError(f"model {spec.name!r}: a classifier has exactly one output")
        require_outputs(spec, self.task, {spec.output_name: ("FP32", 1)})

    def parse_options(self, spec: ModelSpec, raw: Mapping[str, object], defaults: TaskDefaults) -> ClassifyOptions:
        k = raw.get("top_k", defaults.top_k)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise InvalidInput(f"top_k must be a positive integer, got {k!r}")
        ten_crop = raw.get("ten_crop")
        return ClassifyOptions(top_k=min(int(k), spec.num_classes),
                               ten_crop=spec.preprocess.ten_crop_default if ten_crop is None else bool(ten_crop))

    def tta(self, options: ClassifyOptions) -> bool:
        return options.ten_crop

    def prepare(self, data: bytes, spec: ModelSpec, options: ClassifyOptions, *, index: int,
                decode: DecodeOptions) -> Prepared:
        return Prepared(preprocess(data, spec.preprocess, ten_crop=options.ten_crop, index=index, options=decode))

    def postprocess(self, spec: ModelSpec, options: ClassifyOptions, prepared: Sequence[Prepared],
                    outputs: Outputs) -> list[ImageClasses]:
        probs = outputs[spec.output_name]
        per_image = crops_per_image(options.ten_crop)
        probs = probs.reshape(len(prepared), per_image, spec.num_classes)
        averaged = probs.mean(axis=1, dtype=np.float32) if per_image > 1 else probs[:, 0]
        averaged = np.ascontiguousarray(averaged, dtype=np.float32)
        return [ImageClasses(row, ranked(row, spec.labels, options.top_k)) for row in averaged]

    def v1_response(self, result: TaskResult, spec: ModelSpec) -> pb.ClassifyResponse:
        return pb.ClassifyResponse(
            model=result.model, model_version=result.version, ten_crop=result.tta,
            results=[pb.Classification(classes=[pb.ClassScore(index=c.index, label=c.label, score=c.score)
                                                for c in image.classes])
                     for image in result.images])

    def v2_outputs(self, result: TaskResult, spec: ModelSpec,
                   requested: Sequence[RequestedOutput]) -> list[OutputTensor]:
        requested = list(requested) or [RequestedOutput(V2_OUTPUT)]
        reject_unknown_outputs(requested, [V2_OUTPUT], spec.name)
        probs = np.stack([image.probabilities for image in result.images])
        tensors: list[OutputTensor] = []
        for out in requested:
            if out.class_count < 0:
                raise InvalidInput("classification class_count must be > 0")
            if out.class_count > 0:
                k = min(out.class_count, probs.shape[1])
                tensors.append(OutputTensor(out.name, "BYTES", (probs.shape[0], k),
                                            strings=classification_strings(probs, spec.labels, k), binary=out.binary))
            else:
                tensors.append(OutputTensor(out.name, "FP32", tuple(probs.shape), array=probs, binary=out.binary))
        return tensors

    def v2_output_metadata(self, spec: ModelSpec) -> list[dict[str, Any]]:
        return [{"name": V2_OUTPUT, "datatype": "FP32", "shape": [-1, spec.num_classes]}]
