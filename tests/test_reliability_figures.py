"""CI-sized runs of the docs/reliability.md figures (benchmarks/reliability/figures.py; `make soak` runs them full size)."""
from __future__ import annotations

import signal

import pytest

from benchmarks.reliability import figures

pytestmark = pytest.mark.timeout(240)


async def test_sigterm_under_load_cancels_nothing_and_resets_nothing() -> None:
    result = await figures.sigterm_under_load(16, 4, 1.0, 0.5)
    assert result["cancelled"] == 0 and result["resets"] == 0, result
    assert result["exit_code"] == 0 and not result["grace_ran_out"], result
    assert set(result["grpc"]) <= {"OK", "UNAVAILABLE"}, result
    assert all(k == "200" or k.startswith("503+Retry-After") or k.startswith("connection refused")
               for k in result["http"]), result


async def test_sigint_drains_the_same_way() -> None:
    result = await figures.sigterm_under_load(8, 2, 1.0, 0.2, sig=signal.SIGINT)
    assert result["cancelled"] == 0 and result["resets"] == 0 and result["exit_code"] == 0, result


async def test_each_request_is_answered_exactly_once() -> None:
    result = await figures.exactly_once(1000, 64)
    assert result["answered_exactly_once"] == 1000 and result["codes"] == {"OK": 1000}, result


async def test_version_swaps_under_load_fail_nothing_on_either_backend() -> None:
    result = await figures.version_swap(1, clients=4)
    for kind in ("onnxruntime", "triton"):
        assert result[kind]["failed"] == 0, result
        assert len(result[kind]["answers_by_version"]) >= 2, result   # the new version did serve
