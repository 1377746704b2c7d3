"""Fair admission to the decode pool: a per-request pixel budget, a fair scheduler, memory given back.

Why this module exists (issue #9): decoding is the gateway's most expensive step per byte
received, and it ran in one FIFO thread pool. Two requests of 64 huge PNGs queued 128
multi-second decodes ahead of everyone, so a one-image request waited 27 s; and glibc kept
the ~1 GB of freed decode buffers in its arenas long after.

* ``request_pixels`` reads only the image headers (Pillow's ``Image.open`` is lazy), so a
  request whose images add up to more than ``max_request_pixels`` is refused with
  RESOURCE_EXHAUSTED / 413 before a single pixel is decoded.
* ``FairExecutor`` replaces the FIFO pool. Every request is a *lane*; workers take the next
  item round-robin over lanes, so one request's 64 images do not all run before another
  request's one. Round-robin alone is not enough when every worker is busy with a
  multi-second decode, so one extra *express* worker only ever takes small items
  (under ``large_pixels``): a small request never waits behind a large decode.
* After large items, once no large item is running or queued, the executor asks glibc to
  return freed memory to the OS (``malloc_trim``) so RSS falls back near its baseline.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import io
import itertools
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

import grpc

from serving.errors import ServingError

log = logging.getLogger(__name__)

# Images at least this large (in pixels) go to the "large" class; the express worker skips them.
DEFAULT_LARGE_PIXELS = 4_000_000
# The general workers (the only ones that decode large images) run at this nice value on Linux, so
# on a busy machine the express worker and the event loop get the CPU first (a one-way change:
# unprivileged threads may lower their priority but not raise it back).
GENERAL_WORKER_NICE = 5


class RequestTooLarge(ServingError):
    """A request whose decode cost exceeds the per-request budget (RESOURCE_EXHAUSTED / 413).

    Retrying the same request cannot help, so there is no Retry-After: the client must
    send fewer or smaller images.
    """

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def header_pixels(data: bytes | bytearray | memoryview) -> int | None:
    """width x height from the image header without decoding it, or None when Pillow cannot tell.

    An unreadable header is not judged here: the decoder reports it with its own clear
    message. A header past Pillow's decompression-bomb limit counts as unbounded.
    """
    head = bytes(data[:24])
    if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR" and len(head) == 24:
        # a PNG's size sits at a fixed place in its IHDR chunk: read it there (a microsecond, where
        # Pillow takes tens of them; this runs for every request, ahead of tiny decodes)
        pixels = int.from_bytes(head[16:20], "big") * int.from_bytes(head[20:24], "big")
        bomb = Image.MAX_IMAGE_PIXELS is not None and pixels > 2 * Image.MAX_IMAGE_PIXELS   # Pillow's own rule
        return 1 << 62 if bomb else pixels
    try:
        with Image.open(io.BytesIO(bytes(data) if not isinstance(data, bytes) else data)) as img:
            width, height = img.size
    except Image.DecompressionBombError:
        return 1 << 62
    except Exception:  # noqa: BLE001 - untrusted bytes: any failure means "unknown", decode will say why
        return None
    return max(0, int(width)) * max(0, int(height))


def request_pixels(images: Sequence[bytes | bytearray | memoryview], limit: int) -> list[int]:
    """Each image's pixel count from its header; RequestTooLarge when they add up to more than ``limit``.

    ``limit`` <= 0 disables the budget (headers are still read, for the scheduler's cost classes).
    Unknown sizes count as 0: such an image fails in the decoder without decoding much.
    """
    sizes = [header_pixels(data) or 0 for data in images]
    total = sum(sizes)
    if limit > 0 and total > limit:
        biggest = max(range(len(sizes)), key=sizes.__getitem__)
        raise RequestTooLarge(
            f"the request's {len(sizes)} images add up to {total:,} pixels, over the per-request limit of "
            f"{limit:,} (--max-request-pixels); the largest is image {biggest} with {sizes[biggest]:,}. "
            f"Send fewer or smaller images per request")
    return sizes


# ---------------------------------------------------------------- memory

def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def release_memory() -> bool:
    """Ask glibc to hand freed heap memory back to the OS; False where that is not possible."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


# ---------------------------------------------------------------- the fair executor

@dataclass(eq=False)
class _Work:
    fn: Callable[[], Any]
    future: concurrent.futures.Future[Any]
    large: bool


@dataclass(eq=False)
class _Lane:
    """One request's queued work, in submission order."""

    items: deque[_Work] = field(default_factory=deque)


@dataclass
class ExecutorStats:
    """For tests and logs."""

    large_done: int = 0
    small_done: int = 0
    trims: int = 0


class FairExecutor:
    """A thread pool that serves requests round-robin and keeps an express worker for small items.

    ``submit_many(calls, costs)`` queues one request's calls as a lane and returns their
    futures (concurrent.futures, so ``asyncio.wrap_future`` and ``cancel()`` work as with a
    ThreadPoolExecutor). ``workers`` threads take any item; one more thread takes only items
    whose cost is under ``large_pixels``.
    """

    def __init__(self, workers: int, *, large_pixels: int = DEFAULT_LARGE_PIXELS,
                 trim_memory: bool = True, nice_general: bool = True,
                 thread_name_prefix: str = "preprocess") -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.large_pixels = large_pixels
        self.stats = ExecutorStats()
        self._trim = trim_memory
        self._nice = nice_general
        self._lanes: deque[_Lane] = deque()
        self._cond = threading.Condition()
        self._shutdown = False
        self._large_running = 0
        self._large_since_trim = False
        self._threads = [threading.Thread(target=self._worker, args=(False,), daemon=True,
                                          name=f"{thread_name_prefix}_{i}") for i in range(workers)]
        self._threads.append(threading.Thread(target=self._worker, args=(True,), daemon=True,
                                              name=f"{thread_name_prefix}_express"))
        for thread in self._threads:
            thread.start()

    def submit_many(self, calls: Sequence[Callable[[], Any]],
                    costs: Sequence[int] | None = None) -> list[concurrent.futures.Future[Any]]:
        """Queue one request's calls (one lane); ``costs`` are pixels per call (unknown: small)."""
        costs = list(costs) if costs is not None else [0] * len(calls)
        lane = _Lane()
        futures: list[concurrent.futures.Future[Any]] = []
        for fn, cost in itertools.zip_longest(calls, costs, fillvalue=0):
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            lane.items.append(_Work(fn, future, cost >= self.large_pixels))
            futures.append(future)
        with self._cond:
            if self._shutdown:
                raise RuntimeError("the executor is shut down")
            if lane.items:
                self._lanes.append(lane)
                self._cond.notify_all()
        return futures

    def submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        return self.submit_many([fn])[0]

    def shutdown(self, wait: bool = False, *, cancel_futures: bool = True) -> None:
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                for lane in self._lanes:
                    for work in lane.items:
                        work.future.cancel()
                self._lanes.clear()
            self._cond.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()

    @property
    def queued(self) -> int:
        with self._cond:
            return sum(len(lane.items) for lane in self._lanes)

    # ---- workers

    def _take(self, express: bool) -> _Work | None:
        """The next item round-robin over lanes (express: the next small one); caller holds the lock."""
        for _ in range(len(self._lanes)):
            lane = self._lanes[0]
            self._lanes.rotate(-1)   # the next call starts at the following lane
            if not lane.items:
                continue
            if express:
                for i, work in enumerate(lane.items):
                    if not work.large:
                        del lane.items[i]
                        break
                else:
                    continue
            else:
                work = lane.items.popleft()
            if not lane.items:
                self._lanes.remove(lane)
            return work
        return None

    def _worker(self, express: bool) -> None:
        if not express and self._nice and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), GENERAL_WORKER_NICE)
            except OSError:  # not permitted here: fairness still holds, only less CPU preference
                pass
        while True:
            with self._cond:
                work = self._take(express)
                while work is None:
                    if self._shutdown:
                        return
                    self._cond.wait()
                    work = self._take(express)
                if work.large:
                    self._large_running += 1
            try:
                if work.future.set_running_or_notify_cancel():
                    try:
                        result = work.fn()
                    except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                        work.future.set_exception(exc)
                    else:
                        work.future.set_result(result)
                del work.fn
            finally:
                self._after(work)

    def _after(self, work: _Work) -> None:
        trim = False
        with self._cond:
            if work.large:
                self._large_running -= 1
                self.stats.large_done += 1
                self._large_since_trim = True
            else:
                self.stats.small_done += 1
            if (self._trim and self._large_since_trim and self._large_running == 0
                    and not any(w.large for lane in self._lanes for w in lane.items)):
                self._large_since_trim = False
                trim = True
        if trim:
            del work
            if release_memory():
                self.stats.trims += 1
