"""The data plane: validate, decode+crop, batch, infer, average crops, top-k.

Transports (gRPC, HTTP, Open Inference Protocol) call only this module; it is
transport-agnostic and raises only serving.errors types.
(Work in progress: the public signatures are final, the bodies land next.)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from serving.backends.base import Backend
from serving.metrics import Metrics
from serving.repository import ModelSpec
from serving.settings import Settings


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class ClassifyResult:
    model: str
    version: str
    ten_crop: bool
    results: list[list[ClassScore]]


@dataclass(frozen=True)
class ProbabilitiesResult:
    model: str
    version: str
    ten_crop: bool
    probabilities: np.ndarray  # [N, K] float32


@dataclass(frozen=True)
class ModelStatus:
    spec: ModelSpec
    ready: bool


class DataPlane:
    def __init__(self, settings: Settings, backend: Backend, metrics: Metrics) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def ready(self) -> bool:
        raise NotImplementedError

    async def list_models(self) -> list[ModelStatus]:
        raise NotImplementedError

    async def get_model(self, name: str) -> ModelStatus:
        raise NotImplementedError

    async def probabilities(self, model: str, images: Sequence[bytes], *, ten_crop: bool | None = None,
                            deadline: float | None = None) -> ProbabilitiesResult:
        raise NotImplementedError

    async def classify(self, model: str, images: Sequence[bytes], *, top_k: int | None = None,
                       ten_crop: bool | None = None, deadline: float | None = None) -> ClassifyResult:
        raise NotImplementedError
