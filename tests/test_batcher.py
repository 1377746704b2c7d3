"""The dynamic batcher in isolation, driven by a fake async infer function.

Each item is a small int array ``[request_id, item_index]`` so the fake backend
can record exactly which items it saw, and its answer (a function of the item)
lets us check that every result went back to the right place. The answer has two
named outputs of different dtypes and ranks (``value`` float64 [N, 2] and
``request`` int32 [N]), and every submit checks both, so each test also shows that
all outputs are split and joined along the batch axis together.
"""
from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest

from serving.batcher import Batcher as _Batcher
from serving.errors import BackendError, BackendUnavailable, DeadlineExceeded, InvalidInput, ModelNotFound, Overloaded
from serving.metrics import Metrics

pytestmark = pytest.mark.timeout(60)


def items_for(request_id: int, n: int) -> np.ndarray:
    return np.array([[request_id, i] for i in range(n)], dtype=np.int64)


def expected(items: np.ndarray) -> np.ndarray:
    """What FakeBackend answers as ``value``: [id*1000 + index, -id] per item."""
    return np.stack([items[:, 0] * 1000 + items[:, 1], -items[:, 0]], axis=1).astype(np.float64)


def outputs_for(items: np.ndarray) -> dict[str, np.ndarray]:
    """The fake backend's named outputs for a batch."""
    return {"value": expected(items), "request": items[:, 0].astype(np.int32)}


class Batcher(_Batcher):
    """The real Batcher; submit() checks the ``request`` output matches and returns ``value``."""

    async def submit(self, items, *, deadline=None):  # type: ignore[override]
        result = await super().submit(items, deadline=deadline)
        assert set(result) == {"value", "request"}
        ids = np.asarray(items)[:, 0] if len(items) else np.zeros(0)
        assert result["request"].dtype == np.int32
        np.testing.assert_array_equal(result["request"], ids)
        return result["value"]


class FakeBackend:
    """An async infer function that records calls and can be held or made to fail."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[np.ndarray] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.poison: int | None = None  # request id whose presence makes the call fail

    def hold(self) -> None:
        self.gate = asyncio.Event()

    def release(self) -> None:
        assert self.gate is not None
        self.gate.set()

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(batch.copy())
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.poison is not None and (batch[:, 0] == self.poison).any():
            raise RuntimeError("poisoned batch")
        return outputs_for(batch)

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.calls]

    def seen_requests(self) -> set[int]:
        return {int(r) for c in self.calls for r in c[:, 0]}


async def make(fake: FakeBackend, *, max_batch_size: int = 8, delay_s: float = 0.005, queue: int = 1000,
               metrics: Metrics | None = None, **kw) -> Batcher:
    b = Batcher("m", fake.infer, max_batch_size=max_batch_size, max_queue_delay_s=delay_s,
                max_queue_size=queue, metrics=metrics, backend_name="fake", **kw)
    await b.start()
    return b


async def wait_until(predicate, timeout: float = 30.0) -> None:
    """Poll a condition; the timeout only turns a hang into a clear failure (generous: loaded CI)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


async def within(awaitable, timeout_s: float = 30.0):
    """Await something that must not wait on a held backend; a hang fails clearly instead of at the
    file's 60 s timeout. The bound is wide on purpose: it is not a speed check."""
    return await asyncio.wait_for(awaitable, timeout_s)


async def sleep_past(moment: float) -> None:
    """Sleep until time.monotonic() is past ``moment`` (an absolute deadline)."""
    while time.monotonic() <= moment:
        await asyncio.sleep(max(0.001, moment - time.monotonic()))


async def test_concurrent_submitters_share_batches_never_above_max() -> None:
    fake = FakeBackend(delay_s=0.01)
    b = await make(fake, max_batch_size=8)
    reqs = [items_for(r, 1 + r % 3) for r in range(60)]
    results = await asyncio.gather(*(b.submit(x) for x in reqs))
    await b.stop()
    for x, got in zip(reqs, results):
        np.testing.assert_array_equal(got, expected(x))
    assert max(fake.sizes) <= 8
    assert max(fake.sizes) > 1, fake.sizes
    assert sum(fake.sizes) == sum(len(x) for x in reqs)
    assert len(fake.calls) < len(reqs)


async def test_one_request_is_split_across_calls_in_order() -> None:
    fake = FakeBackend()
    b = await make(fake, max_batch_size=4)
    x = items_for(7, 10)
    got = await b.submit(x)
    await b.stop()
    assert fake.sizes == [4, 4, 2]
    np.testing.assert_array_equal(got, expected(x))
    np.testing.assert_array_equal(np.concatenate(fake.calls), x)


async def test_list_of_items_is_accepted() -> None:
    fake = FakeBackend()
    b = await make(fake)
    x = items_for(3, 5)
    got = await b.submit([row for row in x])
    await b.stop()
    np.testing.assert_array_equal(got, expected(x))


async def test_idle_backend_runs_a_lone_item_at_once_whatever_the_delay() -> None:
    """No idle wait: with an hour-long delay a lone request still goes at once, because nothing runs."""
    fake = FakeBackend()
    b = await make(fake, max_batch_size=4, delay_s=3600.0)
    np.testing.assert_array_equal(await within(b.submit(items_for(1, 1))), expected(items_for(1, 1)))
    np.testing.assert_array_equal(await within(b.submit(items_for(2, 3))), expected(items_for(2, 3)))
    assert fake.sizes == [1, 3]                    # each went alone, partial, without waiting for company
    await b.stop()


async def test_items_accumulate_while_the_slot_is_busy_into_full_batches() -> None:
    """Under load batches are as large as ever: while the one slot is busy everything queues, and
    the next call takes all of it (up to max_batch_size), in arrival order."""
    fake = FakeBackend()
    fake.hold()
    b = await make(fake, max_batch_size=8, delay_s=0.0)
    first = asyncio.create_task(b.submit(items_for(0, 1)))
    await within(fake.entered.wait())              # the lone first item went at once, alone
    rest = [asyncio.create_task(b.submit(items_for(r, 1))) for r in range(1, 12)]
    await wait_until(lambda: b.depth == 11)
    for _ in range(20):                            # plenty of loop turns for a wrongly eager worker
        await asyncio.sleep(0)
    assert fake.sizes == [1]                       # nothing overtakes the busy slot
    fake.release()
    for r, task in enumerate([first, *rest]):
        np.testing.assert_array_equal(await within(task), expected(items_for(r, 1)))
    assert fake.sizes == [1, 8, 3]                 # the queue left as full batches
    assert [c[:, 0].tolist() for c in fake.calls[1:]] == [list(range(1, 9)), [9, 10, 11]]
    await b.stop()


async def test_a_free_slot_waits_for_company_while_another_call_runs() -> None:
    """With two slots and one call running, a partial batch waits (an hour here) for a full one;
    a full batch goes at once on the free slot."""
    backend = PerCallGates()
    b = Batcher("m", backend.infer, max_batch_size=4, max_queue_delay_s=3600.0, max_queue_size=100,
                max_concurrent_batches=2)
    await b.start()
    first = asyncio.create_task(b.submit(items_for(1, 1)))
    await wait_until(lambda: len(backend.calls) == 1)          # idle backend: at once
    lone = asyncio.create_task(b.submit(items_for(2, 1)))
    await wait_until(lambda: b.depth == 1)
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(backend.calls) == 1 and not lone.done()         # one call runs: the lone item waits
    rest = asyncio.create_task(b.submit(items_for(3, 3)))
    await wait_until(lambda: len(backend.calls) == 2)          # now a full batch: it goes
    assert backend.calls[1][:, 0].tolist() == [2, 3, 3, 3]
    for gate in backend.gates:
        gate.set()
    for task, r, n in ((first, 1, 1), (lone, 2, 1), (rest, 3, 3)):
        np.testing.assert_array_equal(await within(task), expected(items_for(r, n)))
    await b.stop()


async def test_a_waiting_partial_batch_goes_when_the_delay_passes() -> None:
    backend = PerCallGates()
    b = Batcher("m", backend.infer, max_batch_size=4, max_queue_delay_s=0.01, max_queue_size=100,
                max_concurrent_batches=2)
    await b.start()
    first = asyncio.create_task(b.submit(items_for(1, 1)))
    await wait_until(lambda: len(backend.calls) == 1)
    lone = asyncio.create_task(b.submit(items_for(2, 1)))
    await wait_until(lambda: len(backend.calls) == 2)          # the first call still runs: the delay let it go
    assert backend.active == 2
    for gate in backend.gates:
        gate.set()
    np.testing.assert_array_equal(await within(lone), expected(items_for(2, 1)))
    await within(first)
    await b.stop()


async def test_bounded_queue_rejects_at_once_with_retry_hint() -> None:
    fake = FakeBackend()
    fake.hold()
    b = await make(fake, max_batch_size=2, queue=6, delay_s=0.0)
    first = asyncio.create_task(b.submit(items_for(1, 2)))
    await fake.entered.wait()                      # items of request 1 are in the backend now
    waiting = [asyncio.create_task(b.submit(items_for(r, 3))) for r in (2, 3)]
    await wait_until(lambda: b.depth == 6)
    with pytest.raises(Overloaded) as err:   # refused at once: waiting on the held backend would never end
        await within(b.submit(items_for(4, 1)))
    assert err.value.retry_after_s is not None and err.value.retry_after_s > 0
    assert "queue is full" in err.value.message
    fake.release()
    await asyncio.gather(first, *waiting)
    await b.stop()
    assert 4 not in fake.seen_requests()


async def test_request_larger_than_queue_is_invalid_not_overloaded() -> None:
    b = await make(FakeBackend(), queue=4)
    with pytest.raises(InvalidInput, match="at most 4"):
        await b.submit(items_for(1, 5))
    await b.stop()


async def test_expired_items_are_dropped_before_compute() -> None:
    fake = FakeBackend()
    fake.hold()
    b = await make(fake, max_batch_size=2, delay_s=0.0)
    first = asyncio.create_task(b.submit(items_for(1, 2)))
    await fake.entered.wait()
    soon = time.monotonic() + 0.2
    late = asyncio.create_task(b.submit(items_for(2, 3), deadline=soon))
    ok = asyncio.create_task(b.submit(items_for(3, 1), deadline=time.monotonic() + 3600))
    await wait_until(lambda: b.depth == 4)         # both queued behind the held call
    await sleep_past(soon)                         # request 2's deadline passes while it is queued
    with pytest.raises(DeadlineExceeded):
        await late
    assert b.depth == 1                            # its three items left the queue; request 3's stays
    fake.release()
    np.testing.assert_array_equal(await ok, expected(items_for(3, 1)))
    await first
    await b.stop()
    assert fake.seen_requests() == {1, 3}          # request 2 never reached the backend


async def test_deadline_already_passed_is_not_queued() -> None:
    fake = FakeBackend()
    b = await make(fake)
    with pytest.raises(DeadlineExceeded):
        await b.submit(items_for(1, 2), deadline=time.monotonic() - 0.001)
    await b.stop()
    assert fake.calls == []


async def test_deadline_while_computing_answers_in_time() -> None:
    fake = FakeBackend()
    fake.hold()                                    # never answers until released
    b = await make(fake, delay_s=0.0)
    with pytest.raises(DeadlineExceeded):          # answered at the deadline, not when the backend is done
        await within(b.submit(items_for(1, 1), deadline=time.monotonic() + 0.1))
    assert len(fake.calls) == 1 and not fake.gate.is_set()
    fake.release()
    await b.stop()


async def test_exactly_once_and_in_order_under_many_submitters() -> None:
    rng = random.Random(0)
    fake = FakeBackend(delay_s=0.002)
    b = await make(fake, max_batch_size=16, delay_s=0.002, queue=10_000)   # room for every item: no 429s here

    async def client(rid: int) -> tuple[np.ndarray, np.ndarray]:
        await asyncio.sleep(rng.random() * 0.05)
        x = items_for(rid, rng.randint(1, 7))
        return x, await b.submit(x)

    pairs = await asyncio.gather(*(client(r) for r in range(300)))
    await b.stop()
    for x, got in pairs:
        np.testing.assert_array_equal(got, expected(x))
    seen = np.concatenate(fake.calls)
    keys = [tuple(row) for row in seen.tolist()]
    assert len(keys) == len(set(keys)) == sum(len(x) for x, _ in pairs)   # each item computed exactly once
    assert b.stats.items == len(keys)
    assert max(fake.sizes) <= 16


async def test_backend_exception_fails_only_that_call() -> None:
    fake = FakeBackend()
    fake.hold()
    fake.poison = 2
    b = await make(fake, max_batch_size=4, delay_s=0.01)
    a = asyncio.create_task(b.submit(items_for(1, 4)))       # a full batch: runs at once, held
    await fake.entered.wait()
    poisoned = asyncio.create_task(b.submit(items_for(2, 1)))
    neighbour = asyncio.create_task(b.submit(items_for(3, 2)))  # same call as the poison
    await wait_until(lambda: b.depth == 3)
    fake.release()
    np.testing.assert_array_equal(await a, expected(items_for(1, 4)))
    for task in (poisoned, neighbour):
        with pytest.raises(BackendError, match="backend failed on model 'm'") as info:
            await task
        assert "poisoned" not in info.value.message          # the exception's own text stays in the log
    assert fake.sizes == [4, 3]
    after = await b.submit(items_for(4, 2))                   # the batcher keeps serving
    np.testing.assert_array_equal(after, expected(items_for(4, 2)))
    await b.stop()


async def test_serving_errors_from_backend_pass_through() -> None:
    async def infer(batch: np.ndarray) -> np.ndarray:
        raise ModelNotFound("gone")

    b = Batcher("m", infer, max_batch_size=4, max_queue_delay_s=0, max_queue_size=10)
    await b.start()
    with pytest.raises(ModelNotFound, match="gone"):
        await b.submit(items_for(1, 2))
    await b.stop()


async def test_wrong_number_of_results_is_a_backend_error() -> None:
    async def infer(batch: np.ndarray) -> dict[str, np.ndarray]:
        return {"value": np.zeros((len(batch) + 1, 2)), "request": np.zeros(len(batch), np.int32)}

    b = Batcher("m", infer, max_batch_size=4, max_queue_delay_s=0, max_queue_size=10)
    await b.start()
    with pytest.raises(BackendError, match="for a batch of 2"):
        await b.submit(items_for(1, 2))
    await b.stop()


async def test_cancelled_submitter_items_never_run() -> None:
    fake = FakeBackend()
    fake.hold()
    b = await make(fake, max_batch_size=2, delay_s=0.0)
    first = asyncio.create_task(b.submit(items_for(1, 2)))
    await fake.entered.wait()
    gone = asyncio.create_task(b.submit(items_for(2, 3)))
    stays = asyncio.create_task(b.submit(items_for(3, 1)))
    await wait_until(lambda: b.depth == 4)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert b.depth == 1
    fake.release()
    await first
    np.testing.assert_array_equal(await stays, expected(items_for(3, 1)))
    await b.stop()
    assert 2 not in fake.seen_requests()


async def test_stop_drains_queued_work_then_refuses() -> None:
    fake = FakeBackend(delay_s=0.02)
    b = await make(fake, max_batch_size=4, delay_s=10.0)   # items queue behind the running call
    reqs = [items_for(r, 3) for r in range(5)]
    tasks = [asyncio.create_task(b.submit(x)) for x in reqs]
    await wait_until(lambda: b.depth + b.stats.items == 15)
    await b.stop()
    for x, t in zip(reqs, tasks):
        np.testing.assert_array_equal(t.result(), expected(x))
    with pytest.raises(BackendUnavailable):
        await b.submit(items_for(9, 1))


async def test_stop_timeout_fails_what_cannot_finish() -> None:
    fake = FakeBackend()
    fake.hold()                                              # never released: a stuck backend
    b = await make(fake, max_batch_size=1, delay_s=0.0)
    tasks = [asyncio.create_task(b.submit(items_for(r, 1))) for r in range(3)]
    await fake.entered.wait()
    await within(b.stop(timeout=0.2))                        # returns although the backend never will
    for task in tasks:
        with pytest.raises(BackendUnavailable):
            await task
    assert fake.sizes == [1]                                 # the two queued items never ran


async def test_item_shape_is_checked_before_queueing() -> None:
    fake = FakeBackend()
    b = await make(fake, item_shape=(2,), item_dtype=np.int64)
    with pytest.raises(InvalidInput, match="shape"):
        await b.submit(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(InvalidInput, match="dtype"):
        await b.submit(np.zeros((2, 2), dtype=np.float32))
    await b.stop()
    assert fake.calls == []


async def test_metrics_are_recorded() -> None:
    metrics = Metrics()
    fake = FakeBackend(delay_s=0.005)
    b = await make(fake, max_batch_size=8, metrics=metrics)
    await asyncio.gather(*(b.submit(items_for(r, 2)) for r in range(20)))
    await b.stop()
    labels = {"model": "m"}
    assert metrics.sample("imgserve_batch_size_count", labels) == len(fake.calls)
    assert metrics.sample("imgserve_batch_size_sum", labels) == 40
    assert metrics.sample("imgserve_queue_wait_seconds_count", labels) == 40
    assert metrics.sample("imgserve_backend_duration_seconds_count", {"model": "m", "backend": "fake"}) == len(fake.calls)
    assert metrics.sample("imgserve_queue_depth", labels) == 0
    # batch sizes above 1 land above the first bucket
    assert metrics.sample("imgserve_batch_size_bucket", {"model": "m", "le": "1.0"}) < len(fake.calls)


class PerCallGates:
    """An infer function whose every call waits for its own gate: calls can be finished in any order."""

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []
        self.gates: list[asyncio.Event] = []
        self.active = 0
        self.max_active = 0

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        gate = asyncio.Event()
        self.calls.append(batch.copy())
        self.gates.append(gate)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await gate.wait()
        finally:
            self.active -= 1
        return outputs_for(batch)


async def test_two_execution_slots_run_two_batches_at_once() -> None:
    """max_concurrent_batches=2 (a model with 2 instances): a second batch runs while the first is busy,
    each finishes on its own, and every result goes back to its own request in item order."""
    backend = PerCallGates()
    b = Batcher("m", backend.infer, max_batch_size=3, max_queue_delay_s=0.0, max_queue_size=100,
                max_concurrent_batches=2)
    await b.start()
    first = asyncio.create_task(b.submit(items_for(1, 3)))
    second = asyncio.create_task(b.submit(items_for(2, 3)))
    third = asyncio.create_task(b.submit(items_for(3, 2)))
    await wait_until(lambda: len(backend.calls) == 2)
    assert backend.active == 2                                 # both slots busy at the same time
    assert b.depth == 2 and len(backend.calls) == 2            # the third waits for a free slot
    backend.gates[1].set()                                     # the second call finishes first
    np.testing.assert_array_equal(await within(second), expected(items_for(2, 3)))
    assert not first.done()
    await wait_until(lambda: len(backend.calls) == 3)          # its slot went to the third request
    backend.gates[2].set()
    np.testing.assert_array_equal(await within(third), expected(items_for(3, 2)))
    backend.gates[0].set()
    np.testing.assert_array_equal(await within(first), expected(items_for(1, 3)))
    await b.stop()
    assert backend.max_active == 2
    assert [c[:, 0].tolist() for c in backend.calls] == [[1, 1, 1], [2, 2, 2], [3, 3]]


async def test_one_execution_slot_never_overlaps_calls() -> None:
    backend = PerCallGates()
    b = Batcher("m", backend.infer, max_batch_size=2, max_queue_delay_s=0.0, max_queue_size=100)
    await b.start()
    tasks = [asyncio.create_task(b.submit(items_for(r, 2))) for r in range(3)]
    for n in range(1, 4):
        await wait_until(lambda: len(backend.calls) == n)
        for _ in range(20):
            await asyncio.sleep(0)
        assert len(backend.calls) == n and backend.active == 1  # the next call waits for this one
        backend.gates[-1].set()
    for r, task in enumerate(tasks):
        np.testing.assert_array_equal(await within(task), expected(items_for(r, 2)))
    await b.stop()
    assert backend.max_active == 1


async def test_a_split_request_spread_over_two_slots_is_reassembled_in_order() -> None:
    """One request larger than a batch lands in two concurrent calls that finish in reverse order."""
    backend = PerCallGates()
    b = Batcher("m", backend.infer, max_batch_size=4, max_queue_delay_s=0.0, max_queue_size=100,
                max_concurrent_batches=2)
    await b.start()
    x = items_for(5, 7)
    task = asyncio.create_task(b.submit(x))
    await wait_until(lambda: len(backend.calls) == 2)
    backend.gates[1].set()                                     # items 4..6 come back before items 0..3
    await wait_until(lambda: backend.active == 1)
    assert not task.done()
    backend.gates[0].set()
    np.testing.assert_array_equal(await within(task), expected(x))
    await b.stop()


async def test_flush_without_delay_sends_queued_items_and_keeps_accepting() -> None:
    """What a drain does first: with a call running on one of two slots, queued items would wait the
    (hour-long) delay for company; after the flush they go at once, and late submitters still get in."""
    backend = PerCallGates()
    b = Batcher("m", backend.infer, max_batch_size=8, max_queue_delay_s=3600.0, max_queue_size=100,
                max_concurrent_batches=2)
    await b.start()
    busy = asyncio.create_task(b.submit(items_for(0, 1)))
    await wait_until(lambda: len(backend.calls) == 1)
    early = asyncio.create_task(b.submit(items_for(1, 2)))
    await wait_until(lambda: b.depth == 2)
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(backend.calls) == 1
    b.flush_without_delay()
    await wait_until(lambda: len(backend.calls) == 2)
    backend.gates[1].set()
    np.testing.assert_array_equal(await within(early), expected(items_for(1, 2)))
    late = asyncio.create_task(b.submit(items_for(2, 1)))     # still accepted, and not held for company
    await wait_until(lambda: len(backend.calls) == 3)
    for gate in backend.gates:
        gate.set()
    np.testing.assert_array_equal(await within(late), expected(items_for(2, 1)))
    await within(busy)
    assert [len(c) for c in backend.calls] == [1, 2, 1]
    await b.stop()


async def test_outputs_missing_rows_in_one_output_fail_the_call() -> None:
    """Every output must carry the whole batch; one short output is a BackendError, not a mix-up."""
    async def infer(batch: np.ndarray) -> dict[str, np.ndarray]:
        return {"value": expected(batch), "request": batch[:-1, 0].astype(np.int32)}

    b = Batcher("m", infer, max_batch_size=4, max_queue_delay_s=0, max_queue_size=10)
    await b.start()
    with pytest.raises(BackendError, match="output 'request' of shape"):
        await b.submit(items_for(1, 2))
    await b.stop()
