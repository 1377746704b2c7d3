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
from serving.repository import ModelSpec, Preprocess, TensorSpec
from serving.tasks.detection import max_detections_of
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

    async def infer(self, model: str, batch: np.ndarray) -> dict[str, np.ndarray]:
        self.calls.append((model, batch.copy()))
        self.entered.set()
        if self._gate is not None:
            await self._gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        spec = self.specs[model]
        if spec.task == "detection":
            return bright_box_detections(batch, max_detections_of(spec))
        if spec.task == "segmentation":
            return bright_pixel_segmentation(batch)
        answer = self.answer(batch)
        return answer if isinstance(answer, dict) else {spec.output_name: answer}


# ---------------------------------------------------------------- fake detector and segmenter
# Engines whose answers follow from the pixels, so the gateway's geometry (letterbox there and
# back, mirroring for TTA) is checked exactly without a trained model: the "object" is every
# pixel brighter than BRIGHT in the letterboxed input.

BRIGHT = 200
DETECT_SIZE = 32
DETECT_K = 4


def tiny_detector_spec(name: str = "tinydet", **changes: object) -> ModelSpec:
    """A letterbox detector on 32 x 32 RGB input with K = 4 and labels ("bright", "dim")."""
    spec = ModelSpec(
        name=name, version=1, task="detection",
        preprocess=Preprocess(resize=DETECT_SIZE, crop=DETECT_SIZE, channels=3, geometry="letterbox"),
        labels=("bright", "dim"), max_batch_size=8,
        outputs=(TensorSpec("num_detections", "INT32", (1,)), TensorSpec("detection_boxes", "FP32", (DETECT_K, 4)),
                 TensorSpec("detection_scores", "FP32", (DETECT_K,)),
                 TensorSpec("detection_classes", "INT32", (DETECT_K,))))
    return replace(spec, **changes) if changes else spec


def tiny_segmenter_spec(name: str = "tinyseg", **changes: object) -> ModelSpec:
    """A letterbox segmenter on 32 x 32 RGB input: class 1 = bright pixels, 0 = the rest."""
    spec = ModelSpec(
        name=name, version=1, task="segmentation",
        preprocess=Preprocess(resize=DETECT_SIZE, crop=DETECT_SIZE, channels=3, geometry="letterbox"),
        labels=("background", "bright"), max_batch_size=8,
        outputs=(TensorSpec("labels", "UINT8", (DETECT_SIZE, DETECT_SIZE)),
                 TensorSpec("probabilities", "FP32", (2, DETECT_SIZE, DETECT_SIZE))))
    return replace(spec, **changes) if changes else spec


def bright_box_detections(batch: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """One detection per input: the box around its bright pixels (pixel edges), score 0.9, class 0.

    A second, weaker detection (score 0.2, class 1) covers the whole input, so thresholds
    and max_detections have something to remove.
    """
    n = len(batch)
    out = {"num_detections": np.zeros((n, 1), np.int32), "detection_boxes": np.zeros((n, k, 4), np.float32),
           "detection_scores": np.zeros((n, k), np.float32), "detection_classes": np.zeros((n, k), np.int32)}
    for i, image in enumerate(batch):
        ys, xs = np.nonzero(image.max(axis=-1) > BRIGHT)
        found = 0
        if len(xs):
            out["detection_boxes"][i, 0] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            out["detection_scores"][i, 0] = 0.9
            found = 1
        out["detection_boxes"][i, found] = (0, 0, image.shape[1], image.shape[0])
        out["detection_scores"][i, found] = 0.2
        out["detection_classes"][i, found] = 1
        out["num_detections"][i, 0] = found + 1
    return out


def bright_pixel_segmentation(batch: np.ndarray) -> dict[str, np.ndarray]:
    bright = (batch.max(axis=-1) > BRIGHT)
    probs = np.stack([np.where(bright, 0.1, 0.9), np.where(bright, 0.9, 0.1)], axis=1).astype(np.float32)
    return {"labels": bright.astype(np.uint8), "probabilities": probs}


def rectangle_png(width: int, height: int, box: tuple[int, int, int, int], fmt: str = "PNG") -> bytes:
    """A dark width x height RGB image with a white rectangle at box = (x1, y1, x2, y2) (pixel edges)."""
    pixels = np.full((height, width, 3), 40, np.uint8)
    x1, y1, x2, y2 = box
    pixels[y1:y2, x1:x2] = 255
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


async def until(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll a condition in the event loop; the timeout only turns a hang into a clear failure."""
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.005)
    await asyncio.wait_for(poll(), timeout_s)


def gateway_settings(**overrides: object) -> Settings:
    """Loopback, OS-picked ports, one preprocess thread, no batching delay unless asked."""
    settings = Settings(host="127.0.0.1", grpc_port=0, http_port=0, preprocess_threads=1,
                        max_queue_delay_ms=0.0, triton_health_interval_s=0.1, drain_delay_s=0.0)
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
