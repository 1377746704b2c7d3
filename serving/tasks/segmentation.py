"""Segmentation: letterbox in, a class-index mask at the original image size out.

The engine returns ``labels`` UINT8 [N, S, S] (argmax in the graph) and, optionally,
``probabilities`` FP32 [N, C, S, S]. When probabilities are there the gateway uses them:
the unpadded part is resized bilinearly to the original size and the argmax taken there,
which gives cleaner edges than upscaling labels; with ``tta`` the probabilities of the
image and of its mirror are averaged first. Without probabilities, ``labels`` are
resized nearest-neighbour and TTA is refused.

imgserve.v1 answers with a palette PNG (pixel = class index), the pixel fraction per
class and, when asked (``rle``), COCO RLE per present class. On v2 the output is
``labels`` UINT8 [N, H, W] at the original size, so every image of one v2 request must
have the same size.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clients.proto.imgserve.v1 import imgserve_pb2 as pb
from serving.errors import InvalidInput
from serving.preprocess import DecodeOptions, Letterbox
from serving.repository import ModelSpec, RepositoryError
from serving.tasks.base import (OptionSpec, OutputTensor, Outputs, Prepared, RequestedOutput, TaskDefaults,
                                TaskHandler, TaskResult, label_of, letterbox_views, reject_unknown_outputs,
                                require_outputs)
from serving.tasks.masks import class_fractions, coco_rle, palette_png

LABELS = "labels"
PROBABILITIES = "probabilities"


@dataclass(frozen=True)
class SegmentOptions:
    tta: bool
    rle: bool


@dataclass(frozen=True)
class ImageMask:
    width: int
    height: int
    mask: np.ndarray            # [height, width] uint8 class indices
    fractions: np.ndarray       # [C] float64
    rle: dict[int, dict[str, object]] | None = None


def has_probabilities(spec: ModelSpec) -> bool:
    return PROBABILITIES in spec.output_names


class SegmentationHandler(TaskHandler):
    task = "segmentation"
    v1_method = "Segment"
    v1_request = pb.SegmentRequest
    options = (
        OptionSpec("tta", bool, "horizontal-flip test-time augmentation (averaged probabilities)"),
        OptionSpec("rle", bool, "add COCO RLE per class present (imgserve.v1 only)"),
    )
    postprocess_in_pool = True  # resizing C planes to the original size is real work

    def check_spec(self, spec: ModelSpec) -> None:
        if spec.preprocess.geometry != "letterbox":
            raise RepositoryError(f"model {spec.name!r}: a segmenter uses the letterbox geometry "
                                  f"(imgserve.geometry: letterbox)")
        size = spec.preprocess.crop
        require_outputs(spec, self.task, {LABELS: ("UINT8", 2)})
        if spec.output(LABELS).dims != (size, size):
            raise RepositoryError(f"model {spec.name!r}: labels must be [{size}, {size}], "
                                  f"config.pbtxt says {list(spec.output(LABELS).dims)}")
        if has_probabilities(spec):
            require_outputs(spec, self.task, {PROBABILITIES: ("FP32", 3)})
            dims = spec.output(PROBABILITIES).dims
            if dims[1:] != (size, size) or (dims[0] != len(spec.labels)):
                raise RepositoryError(f"model {spec.name!r}: probabilities must be [{len(spec.labels)}, {size}, "
                                      f"{size}] (one plane per label), config.pbtxt says {list(dims)}")
        if len(spec.labels) < 2 or len(spec.labels) > 256:
            raise RepositoryError(f"model {spec.name!r}: a segmenter needs 2..256 labels (index 0 is usually "
                                  f"background), found {len(spec.labels)}")

    def parse_options(self, spec: ModelSpec, raw: Mapping[str, object], defaults: TaskDefaults) -> SegmentOptions:
        tta = raw.get("tta")
        tta = spec.preprocess.ten_crop_default and has_probabilities(spec) if tta is None else bool(tta)
        if tta and not has_probabilities(spec):
            raise InvalidInput(f"segmenter {spec.name!r} has no probabilities output, so it cannot average "
                               f"test-time augmentations; send tta=false")
        return SegmentOptions(tta=tta, rle=bool(raw.get("rle", False)))

    def tta(self, options: SegmentOptions) -> bool:
        return options.tta

    def prepare(self, data: bytes, spec: ModelSpec, options: SegmentOptions, *, index: int,
                decode: DecodeOptions) -> Prepared:
        return letterbox_views(data, spec, options.tta, index=index, decode_options=decode)

    def postprocess(self, spec: ModelSpec, options: SegmentOptions, prepared: Sequence[Prepared],
                    outputs: Outputs) -> list[ImageMask]:
        views = 2 if options.tta else 1
        results: list[ImageMask] = []
        for i, item in enumerate(prepared):
            geometry: Letterbox = item.geometry
            if has_probabilities(spec):
                probs = outputs[PROBABILITIES][i * views]
                if views == 2:
                    probs = (probs + outputs[PROBABILITIES][i * views + 1][:, :, ::-1]) / 2.0
                mask = geometry.scores_to_original(probs).argmax(axis=0).astype(np.uint8)
            else:
                mask = geometry.mask_to_original(outputs[LABELS][i * views])
            fractions = class_fractions(mask, len(spec.labels))
            rle = None
            if options.rle:
                rle = {int(c): coco_rle(mask == c) for c in np.flatnonzero(fractions > 0)}
            results.append(ImageMask(width=geometry.width, height=geometry.height, mask=mask,
                                     fractions=fractions, rle=rle))
        return results

    def v1_response(self, result: TaskResult, spec: ModelSpec) -> pb.SegmentResponse:
        images = []
        for image in result.images:
            classes = [pb.ClassFraction(index=int(c), label=label_of(spec, int(c)), fraction=float(image.fractions[c]))
                       for c in np.flatnonzero(image.fractions > 0)]
            rle = [pb.ClassRle(index=c, label=label_of(spec, c), size=list(r["size"]), counts=str(r["counts"]))
                   for c, r in sorted((image.rle or {}).items())]
            images.append(pb.ImageSegmentation(width=image.width, height=image.height,
                                               mask_png=palette_png(image.mask), classes=classes, rle=rle))
        return pb.SegmentResponse(model=result.model, model_version=result.version, tta=result.tta, results=images)

    def v2_outputs(self, result: TaskResult, spec: ModelSpec,
                   requested: Sequence[RequestedOutput]) -> list[OutputTensor]:
        requested = list(requested) or [RequestedOutput(LABELS)]
        reject_unknown_outputs(requested, [LABELS], spec.name)
        sizes = {(image.height, image.width) for image in result.images}
        if len(sizes) > 1:
            raise InvalidInput(f"the v2 output {LABELS!r} is one [N, H, W] tensor at the original size, but the "
                               f"images have different sizes ({', '.join(f'{w}x{h}' for h, w in sorted(sizes))}); "
                               f"send them in separate requests, or use imgserve.v1 Segment")
        labels = np.stack([image.mask for image in result.images])
        out = requested[0]
        if out.class_count:
            raise InvalidInput(f"the classification extension does not apply to segmenter {spec.name!r}")
        return [OutputTensor(LABELS, "UINT8", tuple(labels.shape), array=labels, binary=out.binary)]

    def v2_output_metadata(self, spec: ModelSpec) -> list[dict[str, Any]]:
        return [{"name": LABELS, "datatype": "UINT8", "shape": [-1, -1, -1]}]
