"""Typed results of the imgserve SDK.

Both transports decode into the same imgserve.v1 protobuf messages (HTTP via the
proto3 JSON mapping), and these frozen dataclasses are built from those messages
in one place, so a result never depends on the protocol that carried it.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from clients.proto.imgserve.v1 import imgserve_pb2 as pb


@dataclass(frozen=True, slots=True)
class Prediction:
    """One class of one image: its index in the model's output, its label and its probability."""

    index: int
    label: str
    score: float

    @classmethod
    def from_proto(cls, msg: pb.ClassScore) -> Prediction:
        return cls(index=int(msg.index), label=str(msg.label), score=float(msg.score))


@dataclass(frozen=True)
class ClassifyResult:
    """The answer to one classify call.

    ``predictions[i]`` holds the top-k classes of the i-th input image, best first;
    the result also iterates and indexes like that sequence.
    """

    model: str
    version: str
    ten_crop: bool
    predictions: tuple[tuple[Prediction, ...], ...]

    @classmethod
    def from_proto(cls, msg: pb.ClassifyResponse) -> ClassifyResult:
        return cls(
            model=msg.model,
            version=msg.model_version,
            ten_crop=bool(msg.ten_crop),
            predictions=tuple(tuple(Prediction.from_proto(c) for c in r.classes) for r in msg.results),
        )

    @property
    def top1(self) -> tuple[Prediction, ...]:
        """The best class of every image (the server always returns at least one class per image)."""
        return tuple(p[0] for p in self.predictions)

    def __len__(self) -> int:
        return len(self.predictions)

    def __iter__(self) -> Iterator[tuple[Prediction, ...]]:
        return iter(self.predictions)

    def __getitem__(self, i: int) -> tuple[Prediction, ...]:
        return self.predictions[i]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form (lists of dicts)."""
        return {
            "model": self.model,
            "version": self.version,
            "ten_crop": self.ten_crop,
            "predictions": [[asdict(p) for p in image] for image in self.predictions],
        }


@dataclass(frozen=True, slots=True)
class Detection:
    """One object: its box (x1, y1, x2, y2) in original-image pixels, score, class index and label."""

    box: tuple[float, float, float, float]
    score: float
    index: int
    label: str

    @classmethod
    def from_proto(cls, msg: pb.Detection) -> Detection:
        b = msg.box
        return cls(box=(float(b.x1), float(b.y1), float(b.x2), float(b.y2)), score=float(msg.score),
                   index=int(msg.index), label=str(msg.label))


@dataclass(frozen=True)
class ImageDetections:
    """The detections of one image, best first, and that image's size."""

    width: int
    height: int
    detections: tuple[Detection, ...]

    def __len__(self) -> int:
        return len(self.detections)

    def __iter__(self) -> Iterator[Detection]:
        return iter(self.detections)

    def __getitem__(self, i: int) -> Detection:
        return self.detections[i]


@dataclass(frozen=True)
class DetectResult:
    """The answer to one detect call: ``images[i]`` belongs to the i-th input image."""

    model: str
    version: str
    tta: bool
    images: tuple[ImageDetections, ...]

    @classmethod
    def from_proto(cls, msg: pb.DetectResponse) -> DetectResult:
        return cls(model=msg.model, version=msg.model_version, tta=bool(msg.tta), images=tuple(
            ImageDetections(width=int(r.width), height=int(r.height),
                            detections=tuple(Detection.from_proto(d) for d in r.detections))
            for r in msg.results))

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[ImageDetections]:
        return iter(self.images)

    def __getitem__(self, i: int) -> ImageDetections:
        return self.images[i]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "tta": self.tta,
                "images": [{"width": im.width, "height": im.height,
                            "detections": [asdict(d) for d in im.detections]} for im in self.images]}


@dataclass(frozen=True, slots=True)
class ClassShare:
    """A class present in a mask and the fraction of the image's pixels it covers."""

    index: int
    label: str
    fraction: float


@dataclass(frozen=True)
class ImageSegmentation:
    """One image's mask: ``mask_png`` is a palette PNG (pixel = class index) at the original size."""

    width: int
    height: int
    mask_png: bytes
    classes: tuple[ClassShare, ...]
    rle: dict[int, dict[str, Any]]

    @property
    def mask(self) -> Any:
        """The mask as a numpy uint8 array [height, width] of class indices."""
        import io

        import numpy as np
        from PIL import Image

        with Image.open(io.BytesIO(self.mask_png)) as img:
            return np.array(img)


@dataclass(frozen=True)
class SegmentResult:
    """The answer to one segment call: ``images[i]`` belongs to the i-th input image."""

    model: str
    version: str
    tta: bool
    images: tuple[ImageSegmentation, ...]

    @classmethod
    def from_proto(cls, msg: pb.SegmentResponse) -> SegmentResult:
        return cls(model=msg.model, version=msg.model_version, tta=bool(msg.tta), images=tuple(
            ImageSegmentation(
                width=int(r.width), height=int(r.height), mask_png=bytes(r.mask_png),
                classes=tuple(ClassShare(int(c.index), str(c.label), float(c.fraction)) for c in r.classes),
                rle={int(e.index): {"size": [int(v) for v in e.size], "counts": str(e.counts)} for e in r.rle})
            for r in msg.results))

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[ImageSegmentation]:
        return iter(self.images)

    def __getitem__(self, i: int) -> ImageSegmentation:
        return self.images[i]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "tta": self.tta,
                "images": [{"width": im.width, "height": im.height,
                            "classes": [asdict(c) for c in im.classes],
                            "rle": {str(k): v for k, v in im.rle.items()}} for im in self.images]}


@dataclass(frozen=True)
class ModelInfo:
    """A model the gateway serves, with the preprocessing facts a client may need.

    ``resize``: the shorter image side is resized to this, then centre-cropped square;
    ``crop``: the model's input side; ``channels``: 1 (greyscale) or 3 (RGB);
    ``description``: free text from the model's config (empty when it has none; last and
    defaulted so code that builds ModelInfo positionally keeps working).
    """

    name: str
    version: str
    task: str
    num_classes: int
    resize: int
    crop: int
    channels: int
    ten_crop_default: bool
    max_batch_size: int
    ready: bool
    description: str = ""
    labels: tuple[str, ...] = ()
    geometry: str = "crop"

    @classmethod
    def from_proto(cls, msg: pb.ModelInfo) -> ModelInfo:
        return cls(
            name=msg.name, version=msg.version, task=msg.task, num_classes=int(msg.num_classes),
            resize=int(msg.resize), crop=int(msg.crop), channels=int(msg.channels),
            ten_crop_default=bool(msg.ten_crop_default), max_batch_size=int(msg.max_batch_size),
            ready=bool(msg.ready), description=msg.description, labels=tuple(msg.labels),
            geometry=msg.geometry or "crop",
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
