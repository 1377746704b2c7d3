"""Parallel default builds (export/build_jobs.py): real spawned children, builders that are plain functions.

The builders here live at module level so the spawned children can unpickle them, as the real
ones (functools.partial of build_repo's functions) do.
"""
from __future__ import annotations

import functools
import os
import threading
import time
from pathlib import Path

import pytest

from export.build_jobs import auto_jobs, generate_once, run_builders
from export.build_repo import DEFAULT_BUILDERS, BuildContext, BuiltModel, DefaultModel

WAIT_S = 60.0


def _wait_for(path: Path) -> bool:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


def meet(name: str, other: str, ctx: BuildContext) -> BuiltModel:
    """Announce itself, then wait for ``other``'s announcement: only finishes if both run at the same time."""
    (ctx.work_dir / name).write_text(str(os.getpid()))
    met = _wait_for(ctx.work_dir / other)
    return BuiltModel(name, f"met {other}: {met}", metrics={"pid": float(os.getpid()),
                                                          "threads": float(os.environ["OMP_NUM_THREADS"])})


def sleep_then(name: str, seconds: float, ctx: BuildContext) -> BuiltModel:
    time.sleep(seconds)
    (ctx.work_dir / f"{name}.finished").write_text("yes")
    return BuiltModel(name, "slept")


def fail(name: str, ctx: BuildContext) -> BuiltModel:
    raise ValueError(f"{name} has no data")


def die(name: str, ctx: BuildContext) -> BuiltModel:
    os._exit(3)


def _builder(name: str, fn, *args, cost: float = 1.0) -> DefaultModel:  # type: ignore[no-untyped-def]
    return DefaultModel(name, name, functools.partial(fn, name, *args), cost=cost)


def _ctx(tmp_path: Path) -> BuildContext:
    return BuildContext(repo=tmp_path / "staging", runs_dir=tmp_path / "runs", progress=False, work_dir=tmp_path)


def test_two_builders_run_at_once_in_children_and_come_back_in_the_given_order(tmp_path: Path) -> None:
    builders = [_builder("a", meet, "b", cost=1), _builder("b", meet, "a", cost=5)]
    built = run_builders(builders, _ctx(tmp_path), jobs=2)
    assert [b.name for b in built] == ["a", "b"]                       # the caller's order, not finishing order
    assert all(b.summary.endswith("True") for b in built)                # each saw the other running
    pids = {b.metrics["pid"] for b in built}
    assert len(pids) == 2 and os.getpid() not in pids
    cpus = len(os.sched_getaffinity(0))
    assert all(b.metrics["threads"] == max(1, cpus // 2) for b in built)  # the cores are shared out


def test_one_job_builds_in_this_process_one_after_another(tmp_path: Path) -> None:
    built = run_builders([_builder("a", sleep_then, 0.0), _builder("b", sleep_then, 0.0)], _ctx(tmp_path), jobs=1)
    assert [b.name for b in built] == ["a", "b"]


def test_a_failing_builder_names_itself_and_stops_the_others(tmp_path: Path) -> None:
    builders = [_builder("slow", sleep_then, 30.0, cost=10), _builder("broken", fail, cost=1)]
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"building broken failed: ValueError: broken has no data"):
        run_builders(builders, _ctx(tmp_path), jobs=2)
    assert time.monotonic() - start < 25                        # the slow one was terminated, not awaited
    assert not (tmp_path / "slow.finished").exists()


def test_a_builder_whose_process_dies_is_reported_not_waited_for(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"building gone failed: its process ended with code 3"):
        run_builders([_builder("gone", die), _builder("ok", sleep_then, 0.0)], _ctx(tmp_path), jobs=2)


def test_a_shared_dataset_is_generated_once_while_the_other_builder_waits(tmp_path: Path) -> None:
    marker = tmp_path / "shapes" / "dataset.json"
    calls: list[int] = []

    def make() -> str:
        calls.append(1)
        time.sleep(0.3)              # the other thread arrives meanwhile and must wait on the lock
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("{}")
        return "made"

    outcomes: list[str | None] = []
    threads = [threading.Thread(target=lambda: outcomes.append(generate_once(marker, make))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and sorted(outcomes, key=str) == [None, "made"]


def test_the_default_builders_pickle_and_the_longest_go_first() -> None:
    import pickle

    for builder in DEFAULT_BUILDERS:
        assert pickle.loads(pickle.dumps(builder)).name == builder.name  # spawned children receive them
    slowest = max(DEFAULT_BUILDERS, key=lambda b: b.cost)
    assert slowest.name == "densenet_cifar"
    assert auto_jobs(1) == 1 and auto_jobs(2) == 2 and auto_jobs(16) == 2
