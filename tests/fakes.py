"""Test doubles for unit-level gateway tests: a scriptable Backend and an in-process Gateway.

Why: faults such as a backend that never answers, one that raises something
unexpected, or a model version that changes while serving cannot be caused on
purpose with a real engine. ``ScriptedBackend`` implements serving/backends/base.py's
interface with tiny greyscale models (4x4 crops); ``running_gateway`` starts the real
gRPC + HTTP servers of serving/app.py on ports the OS picks (port 0), in this process.
"""
from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace

import numpy as np
from PIL import Image

from serving.app import Gateway
from serving.backends.base import Backend
from serving.repository import ModelSpec, Preprocess
from serving.settings import Settings

CROP = 4
NUM_CLASSES = 3


def tiny_spec(name: str = "tiny", version: int = 1, **changes: object) -> ModelSpec:
    """A 1-channel model taking 4x4 crops with three classes (cheap to decode and to fake)."""
    spec = ModelSpec(name=name, version=version, preprocess=Preprocess(resize=CROP, crop=CROP, channels=1),
                     labels=tuple(f"c{i}" for i in range(NUM_CLASSES)), max_batch_size=8)
    return replace(spec, **changes) if changes else spec


def grey_png(value: int) -> bytes:
    """A 4x4 PNG of one grey level: ScriptedBackend answers class value % 3 for it."""
    buf = io.BytesIO()
    Image.fromarray(np.full((CROP, CROP), value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def one_hot_answers(batch: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Probabilities that put all mass on class (first pixel % num_classes): results are traceable."""
    classes = batch.reshape(len(batch), -1)[:, 0].astype(np.int64) % num_classes
    out = np.zeros((len(batch), num_classes), np.float32)
    out[np.arange(len(batch)), classes] = 1.0
    return out


class ScriptedBackend(Backend):
    """A Backend whose models, answers and faults the test decides.

    ``specs`` can be replaced while serving (a new version). ``hold()`` makes every
    infer call wait until ``release()``; ``fail_with`` makes infer raise it;
    ``models_error`` makes models() raise it once. Every infer call is recorded as (model, batch).
    """

    name = "scripted"

    def __init__(self, *specs: ModelSpec) -> None:
        self.specs: dict[str, ModelSpec] = {s.name: s for s in specs or (tiny_spec(),)}
        self.calls: list[tuple[str, np.ndarray]] = []
        self.started = False
        self.closed = False
        self.fail_with: BaseException | None = None
        self.models_error: BaseException | None = None
        self.answer: Callable[[np.ndarray], np.ndarray] = one_hot_answers
        self.entered = asyncio.Event()
        self._gate: asyncio.Event | None = None

    def hold(self) -> None:
        self._gate = asyncio.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()

    def publish(self, spec: ModelSpec) -> None:
        """Serve ``spec`` from now on (what a repository poll or Triton would report)."""
        self.specs = {**self.specs, spec.name: spec}

    def batches_of(self, model: str) -> list[np.ndarray]:
        return [batch for name, batch in self.calls if name == model]

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def models(self) -> dict[str, ModelSpec]:
        if self.models_error is not None:
            error, self.models_error = self.models_error, None
            raise error
        return dict(self.specs)

    async def ready(self) -> bool:
        return self.started and not self.closed

    async def infer(self, model: str, batch: np.ndarray) -> np.ndarray:
        self.calls.append((model, batch.copy()))
        self.entered.set()
        if self._gate is not None:
            await self._gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return self.answer(batch)


async def until(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll a condition in the event loop; the timeout only turns a hang into a clear failure."""
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.005)
    await asyncio.wait_for(poll(), timeout_s)


def gateway_settings(**overrides: object) -> Settings:
    """Loopback, OS-picked ports, one preprocess thread, no batching delay unless asked."""
    settings = Settings(host="127.0.0.1", grpc_port=0, http_port=0, preprocess_threads=1,
                        max_queue_delay_ms=0.0, triton_health_interval_s=0.1)
    for key, value in overrides.items():
        setattr(settings, key, value)
    settings.validate()
    return settings


@asynccontextmanager
async def running_gateway(backend: Backend, **overrides: object) -> AsyncIterator[Gateway]:
    """The real gateway (gRPC + HTTP) over ``backend`` in this event loop; stopped (grace 0) afterwards.

    Ports are bound as port 0 and read back from the servers, so parallel tests never collide.
    """
    gateway = Gateway(settings=gateway_settings(**overrides), backend=backend)
    await gateway.start()
    try:
        yield gateway
    finally:
        if isinstance(backend, ScriptedBackend):
            backend.release()
        await gateway.close(grace_s=0.0)


def grpc_target(gateway: Gateway) -> str:
    return f"127.0.0.1:{gateway.grpc_port}"


def http_url(gateway: Gateway) -> str:
    return f"http://127.0.0.1:{gateway.http_port}"
