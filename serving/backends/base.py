"""The backend interface every inference engine implements."""
from __future__ import annotations

import abc

import numpy as np

from serving.errors import BackendError
from serving.repository import ModelSpec


class Backend(abc.ABC):
    """Runs already-preprocessed uint8 NHWC batches; knows nothing about images or requests.

    ``infer`` returns the model's named outputs (``spec.outputs``), each with the batch
    on its first axis: a classifier's ``probabilities`` [N, K], a detector's four
    tensors, a segmenter's ``labels`` and ``probabilities``. What they mean is the task
    handler's business (serving/tasks/), not the backend's. Implementations raise
    serving.errors types (ModelNotFound, BackendUnavailable, BackendError) and never
    block the event loop.
    """

    name: str = "backend"
    #: backend calls the batcher keeps in flight per model instance (instance_group count)
    calls_per_instance: int = 1

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect / load models; raise BackendUnavailable when it cannot."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def models(self) -> dict[str, ModelSpec]:
        """The served models by name (refreshed from the engine where that is cheap)."""

    @abc.abstractmethod
    async def infer(self, model: str, batch: np.ndarray) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    async def ready(self) -> bool:
        """True when the engine can serve now (used by readiness and the backend-up gauge)."""

    async def model_ready(self, model: str) -> bool:
        return model in await self.models() and await self.ready()

    async def infer_spec(self, spec: ModelSpec, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run ``batch`` on the model version ``spec`` describes (what the data plane's batchers call).

        Why: a backend that swaps versions in process (the embedded one, serving/reload.py) must let
        requests admitted for the old version finish on it. Backends whose engine routes versions
        itself (Triton) just run the model's current version.
        """
        return await self.infer(spec.name, batch)


def check_outputs(spec: ModelSpec, outputs: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """The engine's outputs checked against ``spec.outputs``; BackendError names what differs.

    Every declared output must be present with ``batch_size`` rows, its declared dims
    (-1 matches any extent) and its declared dtype (values are cast when only the
    width differs, e.g. an engine that returns int64 classes for an INT32 output).
    """
    checked: dict[str, np.ndarray] = {}
    for out in spec.outputs:
        value = outputs.get(out.name)
        if value is None:
            raise BackendError(f"model {spec.name!r} returned no output {out.name!r} "
                               f"(got {', '.join(sorted(outputs)) or 'none'})")
        value = np.asarray(value)
        expected = (batch_size, *out.dims)
        if value.ndim != len(expected) or any(e not in (-1, v) for e, v in zip(expected, value.shape)):
            raise BackendError(f"model {spec.name!r} returned {out.name} of shape {list(value.shape)} for a "
                               f"batch of {batch_size}, expected {list(expected)}")
        checked[out.name] = value.astype(out.numpy_dtype, copy=False)
    return checked
