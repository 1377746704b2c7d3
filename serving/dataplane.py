"""The data plane: validate, decode + geometry, batch, infer, postprocess, for every task.

Transports (gRPC, HTTP, Open Inference Protocol) call only this class. It is
transport- and task-agnostic (what a model's tensors mean is its task handler's
business, serving/tasks/) and raises only serving.errors types. Decoding runs in a
thread pool sized to the cores so the event loop never blocks; crops go
through one Batcher per model, so concurrent requests share backend calls.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.admission import FairExecutor, header_pixels, request_pixels
from serving.backends.base import Backend
from serving.batcher import Batcher
from serving.errors import (BackendError, BackendUnavailable, DeadlineExceeded, InvalidInput, ModelNotFound,
                            ServingError, ShuttingDown)
from serving.metrics import Metrics
from serving.preprocess import DecodeOptions, configure_pillow
from serving.repository import ModelSpec, RepositoryError
from serving.tasks import TaskHandler, check_servable, handler_for
from serving.tasks.base import TaskDefaults, TaskResult
from serving.tasks.classification import ClassScore
from serving.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT_S = 30.0


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
    """Everything between a parsed request and its answer; one per gateway process."""

    def __init__(self, settings: Settings, backend: Backend, metrics: Metrics) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        self._decode_options = DecodeOptions(max_pixels=settings.max_image_pixels)
        self._task_defaults = TaskDefaults(top_k=settings.default_top_k)
        self._executor: FairExecutor | None = None
        self._batchers: dict[str, tuple[ModelSpec, Batcher]] = {}
        self._retired: set[asyncio.Task[None]] = set()
        self._unloaded: set[str] = set()       # models whose batcher forget_unloaded retired
        self._started = False
        self._stopping = False
        self._in_flight = 0                    # requests past validation, not yet answered
        self.last_refusal = 0.0                # when a request was last refused as shutting down
        self.model_control: Any = None         # serving.reload.ModelControl when the backend can reload
        self._idle = asyncio.Event()
        self._idle.set()
        # stop() may take this long to drain queued crops before failing them
        self._drain_timeout_s = float(getattr(settings, "shutdown_grace_s", DEFAULT_DRAIN_TIMEOUT_S))
        configure_pillow(settings.max_image_pixels)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the backend and one batcher per served model."""
        if self._started:
            return
        workers = self.settings.preprocess_threads or self.settings.cores
        self._executor = FairExecutor(workers, large_pixels=self.settings.large_image_pixels)
        await self.backend.start()
        self._stopping = False
        self._started = True
        for spec in (await self.backend.models()).values():
            await self._batcher(spec)
        self.metrics.set_backend_up(self.backend.name, await self.backend.ready())

    async def stop(self, timeout_s: float | None = None) -> None:
        """Graceful stop: refuse new requests, let accepted ones finish, then close the backend.

        Accepted requests (even those still decoding) get their answers; after
        ``timeout_s`` (default ``shutdown_grace_s``) whatever is left is failed with
        BackendUnavailable. The gateway passes what is left of its own grace period.
        """
        self._stopping = True
        timeout_s = self._drain_timeout_s if timeout_s is None else max(0.0, timeout_s)
        end = time.monotonic() + timeout_s
        self.flush_queues()
        if self._in_flight:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except TimeoutError:
                log.warning("stop: %d requests still running after %.1fs; failing them",
                            self._in_flight, timeout_s)
        batchers = [b for _, b in self._batchers.values()]
        self._batchers = {}
        remaining = max(0.0, end - time.monotonic())
        await asyncio.gather(*(b.stop(timeout=remaining) for b in batchers), *self._retired)
        await self.backend.close()
        self.metrics.set_backend_up(self.backend.name, False)
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        self._started = False

    def refuse_new(self) -> None:
        """The drain's refusing phase: new requests get ShuttingDown (UNAVAILABLE / 503 + Retry-After),
        admitted ones go on, and queued crops are sent without waiting for a batch to fill."""
        self._stopping = True
        self.flush_queues()

    @property
    def in_flight(self) -> int:
        """Requests admitted by run() and not yet answered."""
        return self._in_flight

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no admitted request is left (True), or ``timeout_s`` passed (False)."""
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout_s))
        except TimeoutError:
            return False
        return True

    def flush_queues(self) -> None:
        """A drain has begun: queued crops go to the backend now instead of waiting for a batch to fill.

        Requests still decoding are accepted as before; this only removes the batching delay.
        """
        for _, batcher in self._batchers.values():
            batcher.flush_without_delay()

    async def ready(self) -> bool:
        up = self._started and not self._stopping and await self.backend.ready()
        self.metrics.set_backend_up(self.backend.name, up)
        return up

    # ------------------------------------------------------------ models

    async def list_models(self) -> list[ModelStatus]:
        specs = await self.backend.models()
        return [ModelStatus(spec=spec, ready=await self.backend.model_ready(name))
                for name, spec in sorted(specs.items())]

    async def get_model(self, name: str) -> ModelStatus:
        spec = await self._spec(name)
        return ModelStatus(spec=spec, ready=await self.backend.model_ready(name))

    async def _spec(self, name: str) -> ModelSpec:
        specs = await self.backend.models()
        if not name:  # a missing field is the client's mistake, not an unknown model
            raise InvalidInput(f"the request names no model (field 'model'); available models: "
                               f"{', '.join(sorted(specs)) or 'none'}")
        spec = specs.get(name)
        if spec is None:
            available = ", ".join(sorted(specs)) or "none"
            raise ModelNotFound(f"model {name!r} not found; available models: {available}")
        return spec

    async def _batcher(self, spec: ModelSpec) -> Batcher:
        """The model's batcher; a new model version with a different spec gets a fresh one."""
        current = self._batchers.get(spec.name)
        if current is not None and (current[0] is spec or current[0] == spec):
            return current[1]
        if self._stopping:
            raise BackendUnavailable("the server is shutting down")
        batcher = Batcher(
            spec.name, functools.partial(self.backend.infer_spec, spec),
            max_batch_size=self.settings.max_batch_size or spec.max_batch_size,
            max_queue_delay_s=self.settings.max_queue_delay_ms / 1000.0,
            max_queue_size=self.settings.max_queue_size,
            metrics=self.metrics, backend_name=self.backend.name,
            max_concurrent_batches=max(1, spec.instance_count) * max(1, self.backend.calls_per_instance),
            item_shape=spec.input_shape, item_dtype=np.uint8)
        await batcher.start()
        self._batchers[spec.name] = (spec, batcher)
        if current is not None:  # let the old version's queued work finish in the background
            self._retire(current[1])
        return batcher

    def _retire(self, batcher: Batcher, *, unloaded: bool = False) -> None:
        """Stop ``batcher`` in the background: its queued work still runs, then its worker ends.

        ``unloaded``: the model is gone, so its queue-depth series goes too once the batcher
        has stopped (stopping records the depth one last time), unless it was loaded again.
        """
        task = asyncio.create_task(batcher.stop(timeout=self._drain_timeout_s))
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)
        if unloaded:
            name = batcher.model
            task.add_done_callback(lambda _t: None if name in self._batchers else self.metrics.forget_model(name))

    async def forget_unloaded(self) -> list[str]:
        """Retire the batchers of models the backend no longer serves; returns their names.

        Why: an unloaded model's batcher (its worker task, its queue and its
        ``imgserve_queue_depth`` series) would otherwise stay for the life of the process,
        one per model ever unloaded. Model control calls this after every load, unload
        and poll. Requests already queued on such a batcher still finish (``Batcher.stop``
        runs what is queued); the gauge series goes because a depth for a model that is
        not served is misleading. The histograms and counters of the model stay: they are
        cumulative, and dropping them would only show Prometheus a counter reset.
        """
        served = set(await self.backend.models())
        gone = sorted(name for name in self._batchers if name not in served)
        self._unloaded = (self._unloaded | set(gone)) - served
        for name in gone:
            _, batcher = self._batchers.pop(name)
            self._retire(batcher, unloaded=True)
            log.info("model %s unloaded: its batcher is retired", name)
        return gone

    def _forget_if_unloaded(self, name: str) -> None:
        """After a request: a batcher that a late request of an unloaded model re-created goes again.

        A request admitted before the unload may reach ``_batcher`` only after
        ``forget_unloaded`` ran (it was still decoding), which makes a new batcher for it.
        """
        if name in self._unloaded and name in self._batchers:
            _, batcher = self._batchers[name]
            if batcher.idle:
                del self._batchers[name]
                self._retire(batcher, unloaded=True)

    # ------------------------------------------------------------ inference

    async def run(self, model: str, images: Sequence[bytes], *, task: str | None = None,
                  options: Mapping[str, object] | None = None,
                  deadline: float | None = None) -> tuple[TaskHandler, ModelSpec, TaskResult]:
        """One request of any task: validate, decode + geometry, batch, infer, postprocess.

        ``task`` is what the caller's API expects (Classify expects "classification");
        a model of another task is InvalidInput naming the model's task and the method
        that serves it. ``options`` are the task's request options (absent = default).
        """
        self._check_running()
        # counted from here, not from decoding: a drain that has let this request in waits for it
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._run_request(model, images, task, options, deadline)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _run_request(self, model: str, images: Sequence[bytes], task: str | None,
                           options: Mapping[str, object] | None,
                           deadline: float | None) -> tuple[TaskHandler, ModelSpec, TaskResult]:
        if deadline is None:
            deadline = time.monotonic() + self.settings.request_timeout_s
        spec = await self._spec(model)
        handler = self._handler(spec)
        if task is not None and task != spec.task:
            expected = handler_for(task)
            raise InvalidInput(f"model {spec.name!r} is a {spec.task} model: use {handler.v1_method} "
                               f"(imgserve.v1) or the v2 endpoint, not {expected.v1_method}")
        parsed = handler.parse_options(spec, dict(options or {}), self._task_defaults)
        self._check_images(images)
        # headers only, before any decoding: an over-budget request costs no decode time
        costs = request_pixels(images, self.settings.max_request_pixels)
        result = await self._run(handler, spec, parsed, images, deadline, costs)
        return handler, spec, result

    async def probabilities(self, model: str, images: Sequence[bytes], *, ten_crop: bool | None = None,
                            deadline: float | None = None) -> ProbabilitiesResult:
        """Softmax probabilities [N, K] per image (averaged over the ten crops when ten_crop)."""
        options = {} if ten_crop is None else {"ten_crop": ten_crop}
        _, _, result = await self.run(model, images, task="classification", options=options, deadline=deadline)
        probs = np.stack([image.probabilities for image in result.images])
        return ProbabilitiesResult(model=result.model, version=result.version, ten_crop=result.tta,
                                   probabilities=probs)

    async def classify(self, model: str, images: Sequence[bytes], *, top_k: int | None = None,
                       ten_crop: bool | None = None, deadline: float | None = None) -> ClassifyResult:
        """The top-k classes with labels per image, best first (ties: lower class index first)."""
        options: dict[str, object] = {}
        if top_k is not None:
            options["top_k"] = top_k
        if ten_crop is not None:
            options["ten_crop"] = ten_crop
        _, _, result = await self.run(model, images, task="classification", options=options, deadline=deadline)
        return ClassifyResult(model=result.model, version=result.version, ten_crop=result.tta,
                              results=[image.classes for image in result.images])

    def _handler(self, spec: ModelSpec) -> TaskHandler:
        try:
            return check_servable(spec)
        except RepositoryError as exc:  # backends refuse such models at load; this guards the rest
            raise BackendError(f"model {spec.name!r} cannot be served: {exc}") from None

    def _check_running(self) -> None:
        if self._stopping:
            self.last_refusal = time.monotonic()
            raise ShuttingDown()
        if not self._started:
            raise BackendUnavailable("the data plane is not started")

    def _check_images(self, images: Sequence[bytes]) -> None:
        if isinstance(images, (bytes, bytearray, memoryview, str)):
            raise InvalidInput("images must be a list of encoded images, not a single value")
        n = len(images)
        limit = self.settings.max_images_per_request
        if n == 0:
            raise InvalidInput("no images in the request")
        if n > limit:
            raise InvalidInput(f"{n} images in one request; the limit is {limit}")
        for i, data in enumerate(images):
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise InvalidInput(f"image {i}: expected encoded image bytes, got {type(data).__name__}")

    async def _run(self, handler: TaskHandler, spec: ModelSpec, options: Any, images: Sequence[bytes],
                   deadline: float, costs: Sequence[int] | None = None) -> TaskResult:
        if time.monotonic() >= deadline:
            raise DeadlineExceeded("deadline passed before the request started")
        calls = [functools.partial(handler.prepare, bytes(data), spec, options, index=i,
                                   decode=self._decode_options) for i, data in enumerate(images)]
        what = f"decoding {len(images)} images"
        if self._tiny(images, costs):
            prepared = self._inline(spec, what, calls, observe_preprocess=True)
        else:
            prepared = await self._in_pool(spec, deadline, what, calls, observe_preprocess=True, costs=costs)
        batcher = await self._batcher(spec)
        try:
            outputs = await batcher.submit(np.concatenate([p.inputs for p in prepared]), deadline=deadline)
        finally:
            if self._unloaded:
                self._forget_if_unloaded(spec.name)
        if handler.postprocess_in_pool:
            (images_out,) = await self._in_pool(
                spec, deadline, "postprocessing",
                [functools.partial(handler.postprocess, spec, options, prepared, outputs)])
        else:
            images_out = handler.postprocess(spec, options, prepared, outputs)
        return TaskResult(model=spec.name, version=str(spec.version), tta=handler.tta(options), images=images_out)

    def _tiny(self, images: Sequence[bytes], costs: Sequence[int] | None = None) -> bool:
        """Whether decoding these images costs less than a trip through the thread pool.

        A pool hop is a queue put, a worker wake-up, a GIL hand-over and a wake-up of the
        loop: tens of microseconds idle, milliseconds on a busy machine, more than decoding
        a 28x28 PNG. The headers (``costs``: pixels per image, 0 when unknown) say how many
        pixels decoding will produce, so a small file that decompresses into a large image
        (a bomb) still goes to the pool, and so does anything the header cannot size.
        """
        limit = self.settings.inline_preprocess_pixels
        if limit <= 0:
            return False
        if costs is None:
            costs = [header_pixels(data) or 0 for data in images]
        return all(c > 0 for c in costs) and sum(costs) <= limit

    def _inline(self, spec: ModelSpec, what: str, calls: list[Callable[[], Any]], *,
                observe_preprocess: bool = False) -> list[Any]:
        """Run ``calls`` here, on the event loop, with _in_pool's error rules (first failure by position)."""
        start = time.perf_counter()
        results: list[Any] = []
        for i, call in enumerate(calls):
            try:
                results.append(call())
            except ServingError:
                raise
            except Exception as exc:
                log.error("%s (item %d) of model %s failed unexpectedly", what, i, spec.name, exc_info=exc)
                raise ServingError(f"image {i}: internal error while {what}: {type(exc).__name__}") from None
        if observe_preprocess:
            self.metrics.observe_preprocess(spec.name, time.perf_counter() - start)
        return results

    async def _in_pool(self, spec: ModelSpec, deadline: float, what: str, calls: list[Callable[[], Any]],
                       *, observe_preprocess: bool = False, costs: Sequence[int] | None = None) -> list[Any]:
        """Run ``calls`` in the preprocessing pool within the deadline; results in order.

        The calls form one lane of the fair executor (serving/admission.py): they take turns
        with other requests' calls, and ``costs`` (pixels) keep large ones off the express worker.
        The first failing call (by position) decides the error, so messages are deterministic.
        """
        executor = self._executor
        if executor is None:
            raise BackendUnavailable("the data plane is not started")
        start = time.perf_counter()
        try:
            futures = executor.submit_many(calls, costs)
        except RuntimeError:  # shut down between the check above and here
            raise BackendUnavailable("the data plane is stopping") from None
        waiting = [asyncio.wrap_future(f) for f in futures]
        try:
            done, pending = await asyncio.wait(waiting, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:
            for f in futures:
                f.cancel()
            raise
        if pending:
            for f in futures:
                f.cancel()
            for w in pending:
                w.cancel()
            raise DeadlineExceeded(f"deadline exceeded while {what}")
        if observe_preprocess:
            self.metrics.observe_preprocess(spec.name, time.perf_counter() - start)
        for i, w in enumerate(waiting):
            exc = w.exception()
            if exc is None:
                continue
            if isinstance(exc, ServingError):
                raise exc
            log.error("%s (item %d) of model %s failed unexpectedly", what, i, spec.name, exc_info=exc)
            raise ServingError(f"image {i}: internal error while {what}: {type(exc).__name__}")
        return [w.result() for w in waiting]
