"""The data plane follows a model's new version while serving (serving/dataplane.py ``_batcher``).

The backend (a ScriptedBackend) starts reporting version 2 with a different crop size
while version-1 requests are still queued: new requests get a fresh batcher and are
decoded for version 2; the old batcher finishes its queued work and is retired.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
import pytest

from serving.dataplane import DataPlane
from serving.metrics import Metrics
from serving.repository import Preprocess
from serving.settings import Settings
from tests.fakes import ScriptedBackend, grey_png, tiny_spec, until

pytestmark = pytest.mark.timeout(120)

V2 = tiny_spec(version=2, preprocess=Preprocess(resize=6, crop=6, channels=1))


@asynccontextmanager
async def plane_over(backend: ScriptedBackend) -> AsyncIterator[DataPlane]:
    settings = Settings(preprocess_threads=1, max_queue_delay_ms=0.0, shutdown_grace_s=30.0)
    plane = DataPlane(settings, backend, Metrics())
    await plane.start()
    try:
        yield plane
    finally:
        backend.release()
        await plane.stop()


def batcher_of(plane: DataPlane, model: str = "tiny"):
    return plane._batchers[model][1]


async def test_new_version_gets_a_fresh_batcher_and_queued_old_work_finishes() -> None:
    backend = ScriptedBackend(tiny_spec(version=1, max_batch_size=1))
    backend.hold()
    async with plane_over(backend) as plane:
        v1_batcher = batcher_of(plane)
        running = asyncio.create_task(plane.classify("tiny", [grey_png(1)], top_k=1))
        queued = asyncio.create_task(plane.classify("tiny", [grey_png(2)], top_k=1))
        await until(lambda: len(backend.calls) == 1 and v1_batcher.depth == 1)

        backend.publish(V2)                                  # Triton / the repository now serves version 2
        newer = asyncio.create_task(plane.classify("tiny", [grey_png(4)], top_k=1))
        await until(lambda: batcher_of(plane) is not v1_batcher)
        assert batcher_of(plane).item_shape == (6, 6, 1) and v1_batcher.item_shape == (4, 4, 1)
        backend.release()
        answers = await asyncio.wait_for(asyncio.gather(running, queued, newer), 30)

        assert [a.version for a in answers] == ["1", "1", "2"]
        assert [a.results[0][0].index for a in answers] == [1, 2, 1]
        shapes = sorted(batch.shape[1:] for _, batch in backend.calls)
        assert shapes == [(4, 4, 1), (4, 4, 1), (6, 6, 1)]  # old requests decoded for v1, the new one for v2
        await until(lambda: not plane._retired)             # the old batcher drained and was retired
        with pytest.raises(Exception, match="not accepting"):
            await v1_batcher.submit(np.zeros((1, 4, 4, 1), np.uint8))
        assert (await plane.classify("tiny", [grey_png(5)], top_k=1)).version == "2"


async def test_the_same_spec_again_keeps_the_batcher() -> None:
    """A refresh that reports an equal spec (a new object, same content) must not churn batchers."""
    backend = ScriptedBackend(tiny_spec(version=1))
    async with plane_over(backend) as plane:
        before = batcher_of(plane)
        backend.publish(tiny_spec(version=1))
        assert (await plane.classify("tiny", [grey_png(1)], top_k=1)).version == "1"
        assert batcher_of(plane) is before and not plane._retired
