"""Dynamic batching of items from concurrent requests into backend calls.

The batcher knows nothing about images or tasks: a request submits ``n`` items
(one numpy array each, e.g. one crop) and gets back, for every named output of
the backend, an array whose first axis holds the ``n`` results in the same order.
Outputs are split and joined along the batch axis, whatever their dtype.
One batcher serves one model. Items from all requests wait in one FIFO queue.
A batch is dispatched as soon as an execution slot is free and the backend is
idle (no call of this model running): an idle engine never waits for company,
so a lone request pays no batching delay. While calls run, items accumulate
(that is what makes batches grow under load): with one slot they wait for it;
with several slots, a free slot takes a partial batch once ``max_batch_size``
items are waiting or the oldest has waited ``max_queue_delay_s``, so the other
slots' calls are not matched by a stream of tiny ones.
A request's items may be split across several backend calls.

Guarantees:

* the queue is bounded (in items): a request that does not fit fails at once
  with Overloaded (RESOURCE_EXHAUSTED / HTTP 429) and a retry-after estimate;
* every request is answered exactly once: results, or one error;
* a request whose deadline passes is answered DeadlineExceeded; its items
  still queued are removed and never reach the backend;
* a backend exception fails only the requests that had items in that call;
* a cancelled submitter (client went away) has its queued items removed;
* ``stop()`` refuses new work, flushes the queue without waiting for the
  delay, and waits for running calls (graceful drain); ``flush_without_delay()``
  flushes the same way while still accepting work.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from serving.errors import (BackendError, BackendUnavailable, DeadlineExceeded, InvalidInput, Overloaded,
                            ServingError, advertised_retry_after)
from serving.metrics import Metrics

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]
InferFn = Callable[[np.ndarray], Awaitable[Outputs]]

# While a backend call runs: the latest deadline (time.monotonic()) of the requests in its batch,
# so a backend can bound its own remote call (the Triton backend's client_timeout) without the
# batcher's infer signature knowing about deadlines. None when a request in the batch has none.
BATCH_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("imgserve_batch_deadline",
                                                                             default=None)


@dataclass(eq=False)
class _Job:
    """One submit() call: its items, its results as they arrive, and its one answer."""

    items: Sequence[np.ndarray]
    deadline: float | None
    future: asyncio.Future[Outputs]
    results: Outputs | None = None
    remaining: int = 0
    queued: int = 0

    @property
    def done(self) -> bool:
        return self.future.done()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass(eq=False, slots=True)
class _Item:
    job: _Job
    index: int
    enqueued: float


@dataclass
class BatcherStats:
    """Counters for tests and logs (the Prometheus metrics carry the same facts)."""

    batches: int = 0
    items: int = 0
    max_batch_seen: int = 0
    dropped_expired: int = 0


class Batcher:
    """Packs items of concurrent submitters into backend calls of at most ``max_batch_size``."""

    def __init__(self, model: str, infer: InferFn, *, max_batch_size: int, max_queue_delay_s: float,
                 max_queue_size: int, metrics: Metrics | None = None, backend_name: str = "backend",
                 max_concurrent_batches: int = 1, item_shape: tuple[int, ...] | None = None,
                 item_dtype: np.dtype | type | None = None) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_concurrent_batches < 1:
            raise ValueError("max_batch_size, max_queue_size and max_concurrent_batches must be >= 1")
        if max_queue_delay_s < 0:
            raise ValueError("max_queue_delay_s must be >= 0")
        self.model = model
        self._infer = infer
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.metrics = metrics
        self.backend_name = backend_name
        self.item_shape = tuple(item_shape) if item_shape is not None else None
        self.item_dtype = np.dtype(item_dtype) if item_dtype is not None else None
        self.stats = BatcherStats()
        self._max_concurrent = max_concurrent_batches
        self._queue: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(max_concurrent_batches)
        self._running: set[asyncio.Task[None]] = set()
        self._busy = 0                              # backend calls started and not yet finished
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self._no_delay = False                     # a drain has begun: send what is queued at once
        self._seconds_per_item: float | None = None  # EWMA, for the retry-after hint

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._worker is None:
            self._closing = False
            self._worker = asyncio.create_task(self._run(), name=f"batcher[{self.model}]")

    async def stop(self, timeout: float | None = None) -> None:
        """Refuse new items, run everything already queued, wait for running calls.

        After ``timeout`` seconds whatever is still queued or running is failed
        with BackendUnavailable instead.
        """
        self._closing = True
        self._wakeup.set()
        worker, self._worker = self._worker, None
        if worker is None:
            self._fail_queued(BackendUnavailable(f"model {self.model!r} is shutting down"))
            return
        drain = asyncio.ensure_future(self._drain(worker))
        try:
            await asyncio.wait_for(asyncio.shield(drain), timeout)
        except TimeoutError:
            log.warning("batcher %s: drain timed out; failing %d queued items", self.model, len(self._queue))
            worker.cancel()
            for task in list(self._running):
                task.cancel()
            self._fail_queued(BackendUnavailable(f"model {self.model!r} is shutting down"))
            await asyncio.gather(drain, worker, *self._running, return_exceptions=True)

    def flush_without_delay(self) -> None:
        """From now on send queued items at once instead of waiting for a batch to fill.

        For the start of a drain: requests still decoding may yet submit (unlike after
        ``stop()``), but nothing already queued waits for the batching delay any more.
        """
        self._no_delay = True
        self._wakeup.set()

    async def _drain(self, worker: asyncio.Task[None]) -> None:
        await worker
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)

    @property
    def depth(self) -> int:
        """Items waiting (not yet handed to the backend)."""
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing queued and no backend call running: stopping it now fails nobody."""
        return not self._queue and not self._running

    # ------------------------------------------------------------ submitting

    async def submit(self, items: Sequence[np.ndarray] | np.ndarray, *, deadline: float | None = None) -> Outputs:
        """Run ``items`` through the backend; returns each output with the items' rows in input order.

        ``deadline`` is absolute ``time.monotonic()`` seconds. Raises Overloaded,
        DeadlineExceeded, BackendUnavailable (stopping), BackendError or the
        backend's own ServingError.
        """
        n = len(items)
        if n == 0:
            raise InvalidInput("no items to run")
        self._check_items(items)
        if self._closing or self._worker is None:
            raise BackendUnavailable(f"model {self.model!r} is not accepting requests (shutting down)")
        if n > self.max_queue_size:
            raise InvalidInput(f"request needs {n} backend items but the queue of model {self.model!r} holds "
                               f"at most {self.max_queue_size}; send fewer images per request")
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise DeadlineExceeded("deadline passed before the request was queued")
        if len(self._queue) + n > self.max_queue_size:
            hint = self.retry_after_s()
            raise Overloaded(f"model {self.model!r} queue is full ({len(self._queue)} of {self.max_queue_size} "
                             f"items waiting); retry after {advertised_retry_after(hint)} s", retry_after_s=hint)
        loop = asyncio.get_running_loop()
        job = _Job(items=items, deadline=deadline, future=loop.create_future(), remaining=n, queued=n)
        self._queue.extend(_Item(job, i, now) for i in range(n))
        self._record_depth()
        self._wakeup.set()
        try:
            if deadline is None:
                return await asyncio.shield(job.future)
            done, _ = await asyncio.wait({job.future}, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                self._finish(job, DeadlineExceeded(f"deadline exceeded after {time.monotonic() - now:.3f}s "
                                                   f"waiting for model {self.model!r}"))
            return job.future.result()
        except asyncio.CancelledError:
            # The caller went away: its items still waiting must not cost backend time.
            self._abandon(job)
            raise

    def _check_items(self, items: Sequence[np.ndarray] | np.ndarray) -> None:
        """Reject items that could not be stacked with other requests' items (before queueing)."""
        if self.item_shape is None and self.item_dtype is None:
            return
        if isinstance(items, np.ndarray):
            found = [(tuple(items.shape[1:]), items.dtype)]
        else:
            found = [(tuple(np.shape(a)), np.asarray(a).dtype) for a in items]
        for shape, dtype in found:
            if self.item_shape is not None and shape != self.item_shape:
                raise InvalidInput(f"item shape {shape} differs from {self.item_shape} expected by "
                                   f"model {self.model!r}")
            if self.item_dtype is not None and dtype != self.item_dtype:
                raise InvalidInput(f"item dtype {dtype} differs from {self.item_dtype} expected by "
                                   f"model {self.model!r}")

    def retry_after_s(self) -> float:
        """Rough time until the queue has drained, from the measured backend throughput."""
        if self._seconds_per_item is None:
            return 1.0
        estimate = len(self._queue) * self._seconds_per_item / self._max_concurrent
        return float(min(30.0, max(0.05, round(estimate, 2))))

    # ------------------------------------------------------------ answering

    def _finish(self, job: _Job, error: BaseException | None = None) -> None:
        """Answer a job exactly once and drop its items still waiting."""
        if job.done:
            return
        if error is None:
            job.future.set_result(job.results)
        else:
            job.future.set_exception(error)
            job.future.exception()  # mark retrieved: nobody may be waiting any more
            self._remove_queued(job)

    def _abandon(self, job: _Job) -> None:
        if not job.done:
            job.future.cancel()
        self._remove_queued(job)

    def _remove_queued(self, job: _Job) -> None:
        if job.queued > 0:
            self._queue = deque(item for item in self._queue if item.job is not job)
            job.queued = 0
            self._record_depth()

    def _fail_queued(self, error: ServingError) -> None:
        jobs = {item.job for item in self._queue}
        for job in jobs:
            self._finish(job, error)
        self._queue.clear()
        self._record_depth()

    def _record_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(self.model, len(self._queue))

    # ------------------------------------------------------------ the worker

    async def _run(self) -> None:
        while True:
            await self._slots.acquire()
            batch = await self._collect()
            if batch is None:
                self._slots.release()
                return
            if not batch:
                self._slots.release()
                continue
            self._busy += 1
            task = asyncio.create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _collect(self) -> list[_Item] | None:
        """Wait until a batch is due, then take it; None once stopping with nothing queued.

        Called holding a free slot. Due means: anything is queued and no other call is
        running (an idle backend never waits for company), or the batch is full, or the
        oldest item has waited the delay, or a drain has begun.
        """
        while True:
            if self._queue:
                if (self._busy == 0 or self._closing or self._no_delay
                        or len(self._queue) >= self.max_batch_size):
                    break
                wait = self._queue[0].enqueued + self.max_queue_delay_s - time.monotonic()
                if wait <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), wait)
                except TimeoutError:
                    pass
                continue
            if self._closing:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._take()

    def _take(self) -> list[_Item]:
        """Pop up to max_batch_size live items, answering expired ones DeadlineExceeded."""
        now = time.monotonic()
        batch: list[_Item] = []
        while self._queue and len(batch) < self.max_batch_size:
            item = self._queue.popleft()
            job = item.job
            job.queued -= 1
            if job.done:
                continue
            if job.expired(now):
                self.stats.dropped_expired += 1 + job.queued
                self._finish(job, DeadlineExceeded(f"deadline passed while queued for model {self.model!r}"))
                # _finish removed the job's other queued items; batch items of it are skipped below
                continue
            batch.append(item)
        batch = [item for item in batch if not item.job.done]
        self._record_depth()
        if self.metrics is not None:
            for item in batch:
                self.metrics.observe_queue_wait(self.model, now - item.enqueued)
        return batch

    async def _execute(self, batch: list[_Item]) -> None:
        try:
            await self._execute_inner(batch)
        finally:
            self._busy -= 1
            self._slots.release()
            self._wakeup.set()

    async def _execute_inner(self, batch: list[_Item]) -> None:
        size = len(batch)
        try:
            inputs = np.stack([item.job.items[item.index] for item in batch])
        except ValueError as exc:  # only reachable without item_shape: items of different shapes
            self._fail_batch(batch, InvalidInput(f"items of different shapes cannot be batched: {exc}"))
            return
        self.stats.batches += 1
        self.stats.items += size
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, size)
        if self.metrics is not None:
            self.metrics.observe_batch_size(self.model, size)
        start = time.perf_counter()
        deadlines = [item.job.deadline for item in batch]
        BATCH_DEADLINE.set(None if any(d is None for d in deadlines) else max(d for d in deadlines if d is not None))
        try:
            outputs = await self._infer(inputs)
        except ServingError as exc:
            self._fail_batch(batch, exc)
            return
        except asyncio.CancelledError:
            self._fail_batch(batch, BackendUnavailable(f"model {self.model!r} is shutting down"))
            raise
        except Exception:
            # Not a ServingError: a bug or an engine surprise. Its text may name files or internals,
            # so the client gets a generic message and the log gets the traceback.
            log.exception("batcher %s: backend call of %d items failed", self.model, size)
            self._fail_batch(batch, BackendError(f"backend failed on model {self.model!r} "
                                                 f"(internal error; the server log has the details)"))
            return
        elapsed = time.perf_counter() - start
        if self.metrics is not None:
            self.metrics.observe_backend(self.model, self.backend_name, elapsed)
        per_item = elapsed / size
        self._seconds_per_item = per_item if self._seconds_per_item is None else (
            0.8 * self._seconds_per_item + 0.2 * per_item)
        problem = _output_problem(outputs, size)
        if problem:
            self._fail_batch(batch, BackendError(f"backend returned {problem} for a batch of {size} on model "
                                                 f"{self.model!r}"))
            return
        for k, item in enumerate(batch):
            job = item.job
            if job.done:
                continue  # failed, expired or cancelled meanwhile: the result is not wanted
            if job.results is None:
                job.results = {name: np.empty((len(job.items),) + out.shape[1:], dtype=out.dtype)
                               for name, out in outputs.items()}
            elif any(name not in outputs or job.results[name].shape[1:] != outputs[name].shape[1:]
                     for name in job.results) or len(outputs) != len(job.results):
                self._finish(job, BackendError(f"backend outputs changed between batches on model "
                                               f"{self.model!r}"))
                continue
            for name, out in outputs.items():
                job.results[name][item.index] = out[k]
            job.remaining -= 1
            if job.remaining == 0:
                self._finish(job)

    def _fail_batch(self, batch: list[_Item], error: ServingError) -> None:
        for job in {item.job for item in batch}:
            self._finish(job, error)


def _output_problem(outputs: object, size: int) -> str:
    """Why ``outputs`` is not one array per name with ``size`` rows each ('' when it is)."""
    if not isinstance(outputs, dict) or not outputs:
        return f"{type(outputs).__name__} instead of named outputs"
    for name, out in outputs.items():
        if not isinstance(out, np.ndarray) or out.ndim < 1 or out.shape[0] != size:
            return f"output {name!r} of shape {getattr(out, 'shape', type(out).__name__)}"
    return ""
