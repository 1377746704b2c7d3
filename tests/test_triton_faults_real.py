"""A real tritonserver (``imgserve triton-local``) SIGSTOPped and SIGKILLed under load behind the gateway.

benchmarks/reliability/triton_real.py at CI size, over the session's lenet5 repository: no request
may outlive its deadline, the gateway answers UNAVAILABLE fast while Triton is down, and service
is back within 2 s of Triton being ready again. ``make soak`` runs the full size (figures stage
``triton_real``).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.reliability.triton_real import triton_faults_real
from tests.fakes import grey_png

pytestmark = [pytest.mark.triton, pytest.mark.slow, pytest.mark.timeout(900)]   # includes building model_repo (8 min on a loaded 2-core box)

RECOVERY_TARGET_S = 2.0      # issue #9
RECOVERY_MARGIN_S = 1.0      # the shared 2-core CI machine (measured 0.1-0.2 s)
# issue #9 targets < 100 ms after detection (measured 48-90 ms here, docs/reliability.md); the
# assertion only has to tell "fails fast" from "waits out the deadline" on a loaded machine
UNAVAILABLE_P99_BOUND_MS = 500.0


async def test_sigstop_and_sigkill_of_a_real_triton_lose_no_deadline_and_recover_fast(model_repo: Path) -> None:
    result = await triton_faults_real(model_repo, "lenet5", grey_png(7), clients=4, load_s=1.0, stop_s=2.0,
                                      down_s=1.0, deadline_s=5.0)
    assert result["past_deadline"] == 0 and result["deadline_exceeded"] == 0, result
    assert result["not_found"] == 0 and set(result["codes"]) <= {"OK", "UNAVAILABLE"}, result
    for fault in ("SIGSTOP", "SIGKILL"):
        phase = result[fault]
        assert phase["codes_while_down"].get("UNAVAILABLE", 0) > 0, result     # the fault was seen
        assert phase["recovery_s"] is not None and phase["recovery_s"] <= RECOVERY_TARGET_S + RECOVERY_MARGIN_S, result
        assert phase["unavailable_p99_ms_after_detection"] < UNAVAILABLE_P99_BOUND_MS, result
