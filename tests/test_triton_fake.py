"""TritonBackend against an in-process fake Triton (tests/fake_triton.py): error mapping, label
fallback and the spec refresh when Triton serves a new version. No tritonserver needed.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from serving.backends.triton import ModelReloading, TritonBackend, map_error
from serving.errors import (BackendError, BackendUnavailable, DeadlineExceeded, InvalidInput,
                            Overloaded, ServingError)
from serving.repository import Preprocess
from serving.settings import Settings
from tests.fake_triton import FakeTriton, serving_fake_triton
from tests.fakes import tiny_spec
from tests.procs import triton_settings

pytestmark = pytest.mark.timeout(120)

BATCH = np.full((2, 4, 4, 1), 5, np.uint8)   # answer: class 5 % 3 = 2


def settings_for(url: str, repo: Path) -> Settings:
    # A long health interval: only the test decides when the backend looks at Triton again. A generous probe
    # timeout, as no test here is about slow probes: the fake shares the test's event loop, and on a loaded
    # 2-core CI machine its first answer (channel set-up included) once took longer than the 0.5 s default,
    # so the model looked unservable and, with no health loop to retry, stayed absent.
    return triton_settings(url, repo, triton_health_interval_s=3600.0, triton_probe_timeout_s=5.0)


@asynccontextmanager
async def backend_over(fake: FakeTriton, repo: Path) -> AsyncIterator[TritonBackend]:
    async with serving_fake_triton(fake) as url:
        backend = TritonBackend(settings_for(url, repo))
        await backend.start()
        try:
            yield backend
        finally:
            await backend.close()


# ---------------------------------------------------------------- map_error, status by status

@pytest.mark.parametrize("code, message, expected, fragment", [
    (grpc.StatusCode.UNAVAILABLE, "server is shutting down", BackendUnavailable, "unavailable"),
    # a model the backend knows that Triton calls unknown is being reloaded: UNAVAILABLE, retried (#9)
    (grpc.StatusCode.NOT_FOUND, "no such model", ModelReloading, "reloading"),
    (grpc.StatusCode.INTERNAL, "Request for unknown model: 'tiny'", ModelReloading, "reloading"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "timed out", DeadlineExceeded, "did not answer in time"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max (9 vs. 4)", BackendError,
     "max_message_mb"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full", Overloaded, "overloaded"),
    (grpc.StatusCode.INVALID_ARGUMENT, "unexpected shape for input 'image'", InvalidInput, "rejected the input"),
    (grpc.StatusCode.CANCELLED, "cancelled by the server", BackendUnavailable, "was cancelled"),
    (grpc.StatusCode.INTERNAL, "CUDA error: out of memory", BackendError, "failed for model 'tiny'"),
    (grpc.StatusCode.UNKNOWN, "something odd", BackendError, "failed for model 'tiny'"),
], ids=lambda v: v.name if isinstance(v, grpc.StatusCode) else None)
async def test_triton_statuses_become_typed_errors(tmp_path: Path, code: grpc.StatusCode, message: str,
                                                   expected: type[ServingError], fragment: str) -> None:
    """Each status Triton can answer an inference with, over the real wire, becomes its serving error
    (and with it the gRPC code / HTTP status the gateway's clients see)."""
    fake = FakeTriton(tiny_spec())
    async with backend_over(fake, tmp_path) as backend:
        fake.fail_infer = (code, message)
        with pytest.raises(ServingError) as info:
            await backend.infer("tiny", BATCH)
        assert type(info.value) is expected, info.value
        assert fragment in info.value.message
        if expected is Overloaded:
            assert info.value.retry_after_s is not None
        fake.fail_infer = None
        # Only "unavailable" (UNAVAILABLE, CANCELLED) says the server is going away: it is marked unhealthy
        # (and the call retried elsewhere); an error about the request leaves the server in rotation.
        # (A reloading model is not the server's fault: it stays in rotation for the other models.)
        healthy = expected is not BackendUnavailable
        assert [s.healthy for s in backend.servers()] == [healthy]
        if healthy:
            assert ((await backend.infer("tiny", BATCH))["probabilities"]).argmax(axis=1).tolist() == [2, 2]


def test_an_error_without_a_status_is_a_backend_error() -> None:
    error = map_error(InferenceServerException("the channel broke"), model="tiny", url="t:1")
    assert type(error) is BackendError and "the channel broke" in error.message


async def test_unavailable_is_retried_once_on_another_server(tmp_path: Path) -> None:
    down, up = FakeTriton(tiny_spec()), FakeTriton(tiny_spec())
    async with serving_fake_triton(down) as down_url, serving_fake_triton(up) as up_url:
        backend = TritonBackend(settings_for(f"{down_url},{up_url}", tmp_path))
        await backend.start()
        try:
            down.fail_infer = (grpc.StatusCode.UNAVAILABLE, "going away")
            for _ in range(3):   # whichever server round-robin picks first, every call succeeds
                assert ((await backend.infer("tiny", BATCH))["probabilities"]).argmax(axis=1).tolist() == [2, 2]
            assert len(down.infer_calls) == 1                # tried once, then marked unhealthy
            assert {s.url: s.healthy for s in backend.servers()} == {down_url: False, up_url: True}
        finally:
            await backend.close()


# ---------------------------------------------------------------- labels

async def test_labels_come_from_the_local_repository_copy(tmp_path: Path) -> None:
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "labels.txt").write_text("cat\ndog\nfish\n")
    async with backend_over(FakeTriton(tiny_spec()), tmp_path) as backend:
        assert (await backend.models())["tiny"].labels == ("cat", "dog", "fish")


@pytest.mark.parametrize("local_labels", [None, "cat\ndog\n"], ids=["no_local_copy", "wrong_count"])
async def test_labels_fall_back_to_class_numbers(tmp_path: Path, local_labels: str | None) -> None:
    """Triton does not serve label files: without a usable local copy, classes are named "0", "1", ..."""
    if local_labels is not None:
        (tmp_path / "tiny").mkdir()
        (tmp_path / "tiny" / "labels.txt").write_text(local_labels)
    async with backend_over(FakeTriton(tiny_spec()), tmp_path / "absent" if local_labels is None else tmp_path
                            ) as backend:
        spec = (await backend.models())["tiny"]
    assert spec.labels == ("0", "1", "2")
    assert spec.preprocess == tiny_spec().preprocess


# ---------------------------------------------------------------- spec refresh on a new version

async def test_a_new_version_on_triton_refreshes_the_spec(tmp_path: Path) -> None:
    fake = FakeTriton(tiny_spec(version=1))
    async with backend_over(fake, tmp_path) as backend:
        first = (await backend.models())["tiny"]
        assert first.version == 1 and first.input_shape == (4, 4, 1)
        requests_before = fake.config_requests
        await backend.check_health()                         # nothing new: no refetch
        assert fake.config_requests == requests_before
        fake.publish(tiny_spec(version=2, preprocess=Preprocess(resize=8, crop=6, channels=1)))
        await backend.check_health()                         # what the health loop does each interval
        second = (await backend.models())["tiny"]
        assert second.version == 2 and second.input_shape == (6, 6, 1)
        assert fake.config_requests == requests_before + 1
        with pytest.raises(InvalidInput, match="shape"):   # old-size crops are refused before the wire
            await backend.infer("tiny", BATCH)
        out = (await backend.infer("tiny", np.full((3, 6, 6, 1), 4, np.uint8)))["probabilities"]
        assert out.argmax(axis=1).tolist() == [1, 1, 1]
        assert fake.infer_calls[-1] == ("tiny", (3, 6, 6, 1))
