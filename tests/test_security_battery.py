"""The battery whose table docs/reliability.md prints ("TLS and auth") gives the expected status in every row."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.security_battery import battery, table

pytestmark = pytest.mark.timeout(120)


async def test_every_refused_case_is_refused_and_health_still_answers(tmp_path: Path) -> None:
    rows = await battery(tmp_path)
    assert len(rows) >= 30
    assert all(r.ok for r in rows), "\n" + table(rows)
