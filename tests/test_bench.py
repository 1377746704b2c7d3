"""The load generator: its statistics, and real sweeps against a real gateway."""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clients import bench
from clients.commands.bench import concurrency_list
from clients.sdk.aio import AsyncImageClient
from tests.procs import imgserve_executable, run_gateway

# ------------------------------------------------------------------ statistics


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 101, 1000])
def test_percentile_matches_numpy(n: int) -> None:
    rng = np.random.default_rng(n)
    values = sorted(rng.lognormal(mean=1.0, sigma=0.8, size=n).tolist())
    for q in (0, 1, 25, 50, 90, 95, 99, 99.9, 100):
        assert bench.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-12)


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        bench.percentile([], 50)
    with pytest.raises(ValueError):
        bench.percentile([1.0], 101)


def test_latency_summary() -> None:
    seconds = np.random.default_rng(0).exponential(0.01, size=500)
    s = bench.LatencySummary.from_seconds(seconds.tolist())
    assert s is not None and s.count == 500
    ms = seconds * 1000
    assert s.min_ms == pytest.approx(ms.min()) and s.max_ms == pytest.approx(ms.max())
    assert s.mean_ms == pytest.approx(ms.mean())
    assert s.p99_ms == pytest.approx(np.percentile(ms, 99))
    assert s.min_ms <= s.p50_ms <= s.p90_ms <= s.p95_ms <= s.p99_ms <= s.max_ms
    assert bench.LatencySummary.from_seconds([]) is None


def _simulate_closed_loop(concurrency: int, service_s: float, warmup_s: float,
                          duration_s: float) -> bench.ClosedLoopWindow:
    """A FIFO server that finishes one request every ``service_s``, driven by ``concurrency`` closed-loop clients."""
    window = bench.ClosedLoopWindow(warmup_s, warmup_s + duration_s)
    queue = [0.0] * concurrency          # start times of the requests in flight, in service order
    now = 0.0
    while True:
        now += service_s
        started = queue.pop(0)
        window.record(started, now, 1, None)
        if now >= window.end:            # the client stops issuing at the end; the rest drain
            for started in queue:
                now += service_s
                window.record(started, now, 1, None)
            return window
        queue.append(now)


@pytest.mark.parametrize("concurrency, service_s", [(1, 0.01), (32, 0.01), (32, 0.15), (320, 0.015)])
def test_closed_loop_window_measures_the_servers_rate(concurrency: int, service_s: float) -> None:
    """Throughput is the server's rate even when one request takes as long as the window.

    At c=320 and 15 ms per item a request takes 4.8 s in a 5 s window, like 10-crop
    resnet18 at c=32: counting the requests *started* in the window over the time until
    the last finished read about half the rate.
    """
    cycle = concurrency * service_s                       # one request's latency at steady state
    window = _simulate_closed_loop(concurrency, service_s, warmup_s=max(1.0, 2 * cycle), duration_s=5.0)
    assert not window.drained
    assert window.images / window.elapsed_s == pytest.approx(1 / service_s, rel=0.03)
    assert window.elapsed_s == pytest.approx(5.0)
    assert np.median(window.latencies) == pytest.approx(cycle, rel=0.05)


def test_closed_loop_window_falls_back_when_nothing_finishes_inside() -> None:
    window = bench.ClosedLoopWindow(1.0, 2.0)
    window.record(0.5, 0.9, 1, None)                      # warm-up
    window.record(1.2, 4.0, 2, None)                      # started inside, finished after the end
    window.record(1.5, 5.0, 2, "DEADLINE_EXCEEDED")
    assert window.warmup_requests == 1
    assert window.drained
    assert window.images == 2 and window.errors == {"DEADLINE_EXCEEDED": 1}
    assert window.elapsed_s == pytest.approx(4.0)
    assert window.latencies == [pytest.approx(2.8)]
    window.record(1.1, 1.9, 1, None)                      # one finishes inside: only that one counts
    assert not window.drained and window.images == 1 and window.errors == {} and window.elapsed_s == 1.0


def test_batches_cycle_through_every_image() -> None:
    images = [bytes([i]) for i in range(5)]
    batches = bench.make_batches(images, 2)
    assert [len(b) for b in batches] == [2, 2, 2]
    assert {x for b in batches for x in b} == set(images)
    assert bench.make_batches(images, 8) == [[images[i % 5] for i in range(8)]]


def test_concurrency_levels_parse() -> None:
    assert concurrency_list("1,4, 16,32") == (1, 4, 16, 32)
    for bad in ("0,4", "a", "", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            concurrency_list(bad)
    with pytest.raises(ValueError):
        bench.BenchConfig(server="x:1", model="m", batch=0)
    with pytest.raises(ValueError):
        bench.BenchConfig(server="x:1", model="m", duration_s=0)


def test_find_images(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.JPG", "sub/c.jpeg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in bench.find_images([tmp_path])] == ["a.JPG", "b.png", "c.jpeg"]
    with pytest.raises(FileNotFoundError):
        bench.find_images([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        bench.find_images([tmp_path / "empty"])


# ------------------------------------------------------------------ against a real gateway

@pytest.fixture(scope="module")
def gateway(model_repo: Path) -> Iterator[object]:
    with run_gateway(model_repo) as gw:
        yield gw


@pytest.fixture(scope="module")
def digit_dir(mnist_heldout: tuple[np.ndarray, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bench_digits")
    for i, img in enumerate(mnist_heldout[0][:20]):
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    return folder


@pytest.mark.slow
def test_cli_sweep_writes_json_table_and_plot(gateway: object, digit_dir: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "res" / "lenet.json", tmp_path / "res" / "lenet.png"
    proc = subprocess.run(
        [str(imgserve_executable()), "bench", "--server", gateway.grpc_target, "--model", "lenet5",  # type: ignore[attr-defined]
         "--images", str(digit_dir), "--concurrency", "1,4", "--duration", "2", "--warmup", "0.5",
         "--label", "embedded", "--json", str(out), "--plot", str(png)],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert doc["settings"]["concurrency"] == [1, 4] and doc["settings"]["protocol"] == "grpc"
    assert doc["settings"]["label"] == "embedded" and doc["model"]["name"] == "lenet5"
    assert doc["environment"]["cpu_count"] >= 1 and doc["environment"]["python"].count(".") == 2
    assert doc["images"]["count"] == 20
    assert [s["concurrency"] for s in doc["steps"]] == [1, 4]
    for step in doc["steps"]:
        lat = step["latency"]
        assert step["error_count"] == 0 and step["errors"] == {}
        assert step["requests"] > 0 and step["requests_per_s"] > 0 and step["images"] == step["requests"]
        assert step["images_per_s"] == pytest.approx(step["requests"] / step["elapsed_s"])
        # the whole 2 s window plus the last in-flight answers (how long those take is load, not behaviour)
        assert step["elapsed_s"] >= 2.0
        assert step["requests_per_s"] == pytest.approx(step["requests"] / step["elapsed_s"])
        assert lat["count"] == step["requests"] and step["warmup_requests"] > 0
        assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p95_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "4"]
    assert "concurrency    4" in proc.stderr  # the progress bars
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 400 and im.size[1] > 200


def test_http_sweep_with_batches_and_ten_crop(gateway: object) -> None:
    # No warm-up: every request starts inside the window, so however slow a loaded machine is,
    # the step has requests to count (a warm-up request could otherwise outlast the whole window).
    config = bench.BenchConfig(server=gateway.http_url, model="rgbnet", concurrency=(2,),  # type: ignore[attr-defined]
                               duration_s=1.0, warmup_s=0.0, batch=3, ten_crop=True)
    report = asyncio.run(bench.run_sweep(config))  # synthetic images at the model's size
    (step,) = report.steps
    assert step.error_count == 0 and step.requests > 0 and step.images == 3 * step.requests
    assert step.images_per_s == pytest.approx(3 * step.requests_per_s)
    assert report.images["source"].startswith("synthetic") and report.model["resize"] == 72
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["settings"]["ten_crop"] is True and doc["settings"]["protocol"] == "http"


def test_failed_requests_are_counted_by_code(gateway: object) -> None:
    config = bench.BenchConfig(server=gateway.grpc_target, model="lenet5", concurrency=(2,),  # type: ignore[attr-defined]
                               duration_s=0.5, warmup_s=0.0)

    async def run() -> bench.StepResult:
        async with AsyncImageClient(config.server) as client:
            return await bench.run_step(client, config, [[b"not an image"]], 2)
    step = asyncio.run(run())
    assert step.requests == 0 and step.latency is None and step.requests_per_s == 0
    assert set(step.errors) == {"INVALID_ARGUMENT"} and step.errors["INVALID_ARGUMENT"] > 0
    report = bench.BenchReport(config=config, environment={}, model={}, images={}, steps=[step])
    assert "INVALID_ARGUMENT=" in bench.format_table(report)


def test_cli_fails_fast_on_a_bad_model(gateway: object, tmp_path: Path) -> None:
    out = tmp_path / "never.json"
    proc = subprocess.run(
        [str(imgserve_executable()), "bench", "--server", gateway.grpc_target, "--model", "nope",  # type: ignore[attr-defined]
         "--concurrency", "1", "--duration", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "NOT_FOUND" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
