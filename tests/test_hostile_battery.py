"""The hostile battery (benchmarks/reliability/hostile.py) at CI size: every kind of bad request gets its
expected status from a real ``imgserve serve``, the process never dies, and its memory comes back.

The gateway serves a tiny real ONNX classifier and detector (benchmarks/reliability/tinymodel.py), not
lenet5: the battery is about the doors (parsers, limits, routing, the wire), and the tiny models
exercise the same decode, batch and inference path without training anything first.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.reliability.hostile import RSS_MARGIN_MB, hostile_battery, summary, table

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


async def test_every_bad_request_gets_its_status_and_the_gateway_lives(tmp_path: Path) -> None:
    result = await hostile_battery(tmp_path, repeats=2)
    report = "\n" + table(result) + "\n" + str(summary(result))
    assert result["kinds"] >= 30, report
    assert result["crashes"] == 0 and result["alive_at_end"], report
    assert result["exit_code_after_sigterm"] == 0, report   # and it still drains cleanly
    assert all(row.ok for row in result["rows"]), report
    # bad input is the client's fault: refused with a status, never an ERROR line or a traceback
    assert result["tracebacks_in_log"] == 0 and result["error_lines_in_log"] == 0, report
    assert result["rss_mb_after"] <= result["rss_mb_baseline"] + RSS_MARGIN_MB, report
