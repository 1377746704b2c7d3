"""``imgserve bench --compare``: the summary arithmetic, and one tiny real run of all four paths.

No speed is asserted anywhere: the real run only proves that every path served requests
and that the table, JSON and plot have their shape. Speed targets live in benchmarks/.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from clients.bench import LatencySummary
from serving.compare import paths as P
from serving.compare.report import format_table
from serving.compare.runner import CompareConfig, summarise
from tests.procs import imgserve_executable


def step(path: str, rnd: int, rate: float, c: int = 4) -> P.StepStats:
    lat = LatencySummary.from_seconds([0.001 * (rnd + 1), 0.002 * (rnd + 1)])
    return P.StepStats(path=path, model="m", image_size=28, concurrency=c, round=rnd, images=int(rate),
                       errors={}, elapsed_s=1.0, images_per_s=rate, latency=lat, client_cpu_s=0.0)


def test_ratios_are_taken_within_a_round_then_summarised() -> None:
    """Round 0: gateway 100 vs ort 200 (0.5); round 1: 300 vs 400 (0.75). The ratio of the medians
    (200/300) would hide that the rounds disagree; the per-round ratios show it."""
    steps = [step(P.ORT, 0, 200), step(P.GATEWAY, 0, 100), step(P.ORT, 1, 400), step(P.GATEWAY, 1, 300),
             step(P.TRITON, 0, 50), step(P.TRITON, 1, 100), step(P.GATEWAY_TRITON, 0, 25), step(P.GATEWAY_TRITON, 1, 90)]
    cells = {c.path: c for c in summarise(steps)}
    gw = cells[P.GATEWAY]
    assert gw.images_per_s == {"median": 200.0, "min": 100.0, "max": 300.0}
    assert gw.ratios["gateway/ort"] == {"median": 0.625, "min": 0.5, "max": 0.75}
    assert gw.ratios["gateway/triton"]["min"] == 2.0 and gw.ratios["gateway/triton"]["max"] == 3.0
    assert cells[P.GATEWAY_TRITON].ratios["gateway-triton/triton"]["min"] == pytest.approx(0.5)
    assert set(cells[P.ORT].ratios) == set()
    table = format_table(list(cells.values()))
    assert "gateway/ort 0.62 [0.50-0.75]" in table and table.count("\n") >= 5


def test_a_drained_window_is_flagged_in_the_table() -> None:
    """A rate from a round where no request finished inside the window is biased low: the table says so."""
    drained = step(P.GATEWAY, 1, 3.0)
    drained.drained = True
    cells = {c.path: c for c in summarise([step(P.GATEWAY, 0, 7.0), drained, step(P.ORT, 0, 9.0)])}
    assert cells[P.GATEWAY].drained == 1 and cells[P.ORT].drained == 0
    table = format_table(list(cells.values()))
    assert "3.0-7.0]*" in table and "outlasted the measured window" in table
    assert "outlasted" not in format_table([cells[P.ORT]])


def test_config_rejects_unknown_paths() -> None:
    with pytest.raises(ValueError, match="unknown paths"):
        CompareConfig(model_repository=Path("."), models=("m",), paths=("ort", "nginx"))


@pytest.mark.slow
def test_tiny_compare_runs_every_path(model_repo: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    proc = subprocess.run(
        [str(imgserve_executable()), "bench", "--compare", "--model-repository", str(model_repo), "-m", "lenet5",
         "-c", "1,2", "--rounds", "2", "--duration", "0.3", "--warmup", "0.1", "--quiet",
         "--paths", "ort,gateway,triton,gateway-triton,gateway-10crop", "--json", str(out), "--plot", str(png)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["kind"] == "imgserve bench --compare" and doc["command"].startswith("imgserve bench --compare ")
    assert doc["environment"]["load_average_1m"] is not None
    paths = {P.ORT, P.GATEWAY, P.TRITON, P.GATEWAY_TRITON, P.GATEWAY_TEN_CROP}
    cells = {(s["path"], s["concurrency"], s["round"]) for s in doc["steps"]}
    assert cells == {(p, c, r) for p in paths for c in (1, 2) for r in (0, 1)}
    for s in doc["steps"]:
        assert s["images"] > 0 and s["errors"] == {}, s          # every path answered, none failed
        assert s["model"] == "lenet5" and s["image_size"] == 28
    summary = {(c["path"], c["concurrency"]): c for c in doc["summary"]}
    assert len(summary) == 10 and all(c["rounds"] == 2 for c in summary.values())
    assert set(summary[(P.GATEWAY, 2)]["ratios"]) == {"gateway/ort", "gateway/triton", "10crop-cost"}
    assert set(summary[(P.GATEWAY_TRITON, 1)]["ratios"]) == {"gateway-triton/triton"}
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("lenet5")]
    assert sorted((r[3], r[2]) for r in rows) == sorted((p, str(c)) for p in paths for c in (1, 2))
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 400
