"""The backend interface every inference engine implements."""
from __future__ import annotations

import abc

import numpy as np

from serving.repository import ModelSpec


class Backend(abc.ABC):
    """Runs already-preprocessed uint8 NHWC batches; knows nothing about images or requests.

    ``infer`` returns float32 softmax probabilities of shape [N, num_classes].
    Implementations raise serving.errors types (ModelNotFound, BackendUnavailable,
    BackendError) and never block the event loop.
    """

    name: str = "backend"

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect / load models; raise BackendUnavailable when it cannot."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def models(self) -> dict[str, ModelSpec]:
        """The served models by name (refreshed from the engine where that is cheap)."""

    @abc.abstractmethod
    async def infer(self, model: str, batch: np.ndarray) -> np.ndarray: ...

    @abc.abstractmethod
    async def ready(self) -> bool:
        """True when the engine can serve now (used by readiness and the backend-up gauge)."""

    async def model_ready(self, model: str) -> bool:
        return model in await self.models() and await self.ready()
