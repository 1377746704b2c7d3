"""Run the default repository's builders, one after another or several at once in child processes.

Why: small CPU models train poorly on two threads. A LeNet, a CIFAR-scale net or the 128 px dense
models keep two cores only partly busy with one training (data loading, the optimizer step and
small convolutions run on one thread), so on a 2-core machine two builds with one thread each
finish sooner than the same builds one after another with two threads. The first ``make run`` and
every CI run pay for this build, so ``imgserve build-repo --jobs`` (default: auto) runs builders in
parallel: the longest first (each builder states its relative ``cost``), each in a spawned child
with ``cores // jobs`` torch threads. Children share the build's scratch directory; the datasets in
it are generated once, under a file lock (``generate_once``).

A failed builder stops the build: the other children are terminated and the error names the model.
"""
from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import queue
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, TypeVar

from export.progress import stage_line

if TYPE_CHECKING:
    from export.build_repo import BuildContext, BuiltModel, DefaultModel

T = TypeVar("T")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
POLL_S = 0.5


def auto_jobs(cpus: int | None = None) -> int:
    """Parallel builds for ``cpus`` cores: 2 from 2 cores up (one thread each on 2 cores), else 1.

    More than two at once helps little: the longest builder alone takes about a third of the total.
    """
    if cpus is None:
        cpus = usable_cpus()
    return 2 if cpus >= 2 else 1


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask, which container CPU sets narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created), held for the ``with`` block, across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def generate_once(marker: Path, make: Callable[[], T]) -> T | None:
    """Call ``make`` unless ``marker`` exists, holding a lock beside it: concurrent builders wait for
    the one that generates a shared dataset instead of generating it twice. Returns ``make``'s result,
    or None when the marker was already there."""
    with file_lock(marker.parent.with_name(f".{marker.parent.name}.lock")):
        if marker.is_file():
            return None
        return make()


def build_one(builder: "DefaultModel", ctx: "BuildContext") -> "BuiltModel":
    """Run one builder with its opening and closing stage lines."""
    stage_line(f"build-repo: building {builder.name} ({builder.description})", enabled=ctx.progress)
    start = time.perf_counter()
    built = builder.build(ctx)
    stage_line(f"build-repo: {builder.name} done in {time.perf_counter() - start:.0f}s: {built.summary}",
               enabled=ctx.progress)
    return built


def _child(builder: "DefaultModel", ctx: "BuildContext", threads: int, results: "mp.Queue") -> None:
    """A spawned child: pin the thread count before torch loads, build, post (name, built, error)."""
    for name in THREAD_ENV:
        os.environ[name] = str(threads)
    os.environ["IMGSERVE_NO_BARS"] = "1"  # two live bars on one terminal would overwrite each other
    try:
        import torch

        torch.set_num_threads(threads)
        results.put((builder.name, build_one(builder, ctx), None))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it
        results.put((builder.name, None, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise SystemExit(1) from None


def run_builders(builders: list["DefaultModel"], ctx: "BuildContext", *, jobs: int = 1) -> list["BuiltModel"]:
    """Each builder's result, in the order given; ``jobs`` > 1 builds that many at once (see the module doc)."""
    if jobs <= 1 or len(builders) <= 1:
        return [build_one(b, ctx) for b in builders]
    jobs = min(jobs, len(builders))
    threads = max(1, usable_cpus() // jobs)
    spawn = mp.get_context("spawn")
    results: mp.Queue = spawn.Queue()
    waiting = sorted(builders, key=lambda b: -b.cost)  # longest first: the shortest finish the build
    running: dict[str, mp.process.BaseProcess] = {}
    done: dict[str, BuiltModel] = {}
    stage_line(f"build-repo: {len(builders)} models, {jobs} at a time with {threads} thread(s) each",
               enabled=ctx.progress)
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                builder = waiting.pop(0)
                child = spawn.Process(target=_child, args=(builder, ctx, threads, results),
                                      name=f"build-{builder.name}")
                child.start()
                running[builder.name] = child
            try:
                name, built, error = results.get(timeout=POLL_S)
            except queue.Empty:
                for name, child in running.items():
                    if child.exitcode not in (None, 0):  # died without a word: killed (OOM?) or crashed
                        raise RuntimeError(f"building {name} failed: its process ended with code {child.exitcode}")
                continue
            running.pop(name).join()
            if error is not None:
                raise RuntimeError(f"building {name} failed: {error}")
            done[name] = built
    finally:
        for child in running.values():
            child.terminate()
        for child in running.values():
            child.join()
    return [done[b.name] for b in builders]
