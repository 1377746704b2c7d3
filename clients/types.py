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

    @classmethod
    def from_proto(cls, msg: pb.ModelInfo) -> ModelInfo:
        return cls(
            name=msg.name, version=msg.version, task=msg.task, num_classes=int(msg.num_classes),
            resize=int(msg.resize), crop=int(msg.crop), channels=int(msg.channels),
            ten_crop_default=bool(msg.ten_crop_default), max_batch_size=int(msg.max_batch_size),
            ready=bool(msg.ready), description=msg.description,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
