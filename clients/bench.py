"""Closed-loop load generator (the engine behind ``imgserve bench``).

For each concurrency level N, N asyncio workers share one AsyncImageClient and
send requests back to back: a worker sends its next request as soon as the
previous one answers, like perf_analyzer's concurrency mode. Each step first
runs ``warmup_s`` unrecorded, then records every request *started* in the next
``duration_s``; requests still in flight at the end are awaited and counted,
and throughput is measured over the real span from the window start to the last
recorded answer. Latency percentiles cover successful requests only; errors are
counted by status code.
"""
from __future__ import annotations

import asyncio
import io
import math
import os
import platform
import socket
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from clients.sdk.aio import AsyncImageClient
from clients.sdk.errors import ImgserveError
from clients.sdk.wire import parse_target

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
PERCENTILES = (50.0, 90.0, 95.0, 99.0)
SCHEMA_VERSION = 1


# ---------------------------------------------------------------- statistics

def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ascending values, linearly interpolated.

    Same definition as numpy's default (``method="linear"``): the value at rank
    (n - 1) * q / 100, interpolated between its two neighbours.
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    rank = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = rank - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


@dataclass(frozen=True)
class LatencySummary:
    """Latency of successful requests, in milliseconds."""

    count: int
    mean_ms: float
    min_ms: float
    max_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float

    @classmethod
    def from_seconds(cls, samples: Sequence[float]) -> LatencySummary | None:
        if not samples:
            return None
        ms = sorted(s * 1000.0 for s in samples)
        p50, p90, p95, p99 = (percentile(ms, q) for q in PERCENTILES)
        return cls(count=len(ms), mean_ms=math.fsum(ms) / len(ms), min_ms=ms[0], max_ms=ms[-1],
                   p50_ms=p50, p90_ms=p90, p95_ms=p95, p99_ms=p99)


# ---------------------------------------------------------------- settings and results

@dataclass(frozen=True)
class BenchConfig:
    server: str
    model: str
    protocol: str | None = None         # None: from the server address (http:// URL -> "http", else "grpc")
    concurrency: tuple[int, ...] = (1, 4, 16, 32)
    duration_s: float = 10.0
    warmup_s: float = 2.0
    batch: int = 1                      # images per request
    ten_crop: bool | None = None        # None: the model's default
    top_k: int = 1
    timeout_s: float | None = 30.0
    label: str = ""                     # free-form tag, e.g. the backend under test

    def __post_init__(self) -> None:
        object.__setattr__(self, "protocol", parse_target(self.server, self.protocol).protocol)
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError("duration must be > 0 and warmup >= 0 seconds")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError("timeout must be > 0 seconds")


@dataclass(frozen=True)
class StepResult:
    concurrency: int
    requests: int                 # successful requests in the window
    images: int                   # images in those requests
    errors: dict[str, int]        # failed requests by status code
    elapsed_s: float
    requests_per_s: float
    images_per_s: float
    latency: LatencySummary | None
    client_cpu_s: float = 0.0     # CPU the load generator itself used during the step (it may share the host)
    warmup_requests: int = 0      # requests that finished before the window opened (not counted above)
    drained: bool = False         # nothing finished inside the window: counted the requests started in it

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["error_count"] = self.error_count
        return d


@dataclass(frozen=True)
class BenchReport:
    config: BenchConfig
    environment: dict[str, Any]
    model: dict[str, Any]
    images: dict[str, Any]
    steps: list[StepResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        settings = asdict(self.config)
        settings["concurrency"] = list(self.config.concurrency)
        return {"schema_version": SCHEMA_VERSION, "settings": settings, "environment": self.environment,
                "model": self.model, "images": self.images, "steps": [s.to_dict() for s in self.steps]}


def environment() -> dict[str, Any]:
    """Facts about the load-generating host that a reader needs to compare runs."""
    import aiohttp
    import grpc

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
        "aiohttp": aiohttp.__version__,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------- payloads

def find_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named directly, plus those under named directories (recursively, sorted)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"no such image file or directory: {p}")
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {', '.join(map(str, paths))}")
    return found


def synthetic_images(count: int, side: int, channels: int, seed: int = 0) -> list[bytes]:
    """Random-noise PNGs of side x side pixels: content does not change a classifier's cost."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        shape = (side, side) if channels == 1 else (side, side, 3)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def make_batches(images: Sequence[bytes], batch: int) -> list[list[bytes]]:
    """Request payloads that cycle through the images; every image is used at least once."""
    if not images:
        raise ValueError("no images to send")
    n = max(1, math.ceil(len(images) / batch))
    return [[images[(i * batch + j) % len(images)] for j in range(batch)] for i in range(n)]


# ---------------------------------------------------------------- the load loop

ProgressFactory = Callable[[int], Any]  # concurrency -> a tqdm-like bar (update/set_postfix_str/close)


class ClosedLoopWindow:
    """What one closed-loop step measured: the requests that *finished* inside ``[start, end)``.

    Why finished and not started: with c requests in flight, each taking L seconds,
    counting those started in the window and dividing by the time until the last of them
    finished puts the drain (up to L) in the denominator, so throughput reads W / (W + L)
    of the truth. That is half when a request takes as long as the window, which 10-crop
    requests at c=32 did. Completions inside a fixed window are what the server delivered
    at steady state, as perf_analyzer counts them. Only when nothing finished inside the
    window (one request outlasts it) does the step fall back to the requests started in it
    over the time until the last finished, and ``drained`` says so.
    One event loop (or one thread) records into it: no locks.
    """

    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end
        self._latencies: list[float] = []
        self._images = 0
        self._errors: Counter[str] = Counter()
        self._late: list[tuple[float, int, str | None]] = []   # started inside, finished after the end
        self._last_done = start
        self.warmup_requests = 0                                 # finished before the window opened

    def record(self, started: float, done: float, images: int, error: str | None) -> None:
        if done < self.start:
            self.warmup_requests += 1
        elif done < self.end:
            if error is None:
                self._latencies.append(done - started)
                self._images += images
            else:
                self._errors[error] += 1
        elif started >= self.start:
            self._late.append((done - started, images, error))
            self._last_done = max(self._last_done, done)

    @property
    def drained(self) -> bool:
        """True when no request finished inside the window and the late ones are what is reported."""
        return not self._latencies and not self._errors and bool(self._late)

    @property
    def latencies(self) -> list[float]:
        return [lat for lat, _, err in self._late if err is None] if self.drained else self._latencies

    @property
    def images(self) -> int:
        return sum(n for _, n, err in self._late if err is None) if self.drained else self._images

    @property
    def errors(self) -> dict[str, int]:
        if self.drained:
            return dict(Counter(err for _, _, err in self._late if err is not None))
        return dict(self._errors)

    @property
    def elapsed_s(self) -> float:
        return max(self._last_done - self.start, 1e-9) if self.drained else self.end - self.start


RequestFn = Callable[[Sequence[bytes]], Awaitable[Any]]


def request_for_task(client: AsyncImageClient, config: BenchConfig, task: str) -> RequestFn:
    """The SDK call that exercises a model of ``task``: Classify, Detect or Segment.

    ``config.ten_crop`` is the model's test-time augmentation switch whatever the task
    (10 crops for a classifier, a mirrored view for a detector or segmenter).
    """
    if task == "detection":
        return lambda images: client.detect(images, config.model, tta=config.ten_crop, timeout=config.timeout_s)
    if task == "segmentation":
        return lambda images: client.segment(images, config.model, tta=config.ten_crop, timeout=config.timeout_s)
    return lambda images: client.classify(images, config.model, top_k=config.top_k, ten_crop=config.ten_crop,
                                          timeout=config.timeout_s)


async def run_step(client: AsyncImageClient, config: BenchConfig, batches: Sequence[Sequence[bytes]],
                   concurrency: int, progress: Any = None, send: RequestFn | None = None) -> StepResult:
    """One closed-loop step at ``concurrency`` workers (warm-up, then the measured window)."""
    clock = time.perf_counter
    cpu_start = time.process_time()
    start = clock()
    window_start = start + config.warmup_s
    window_end = window_start + config.duration_s
    rec = ClosedLoopWindow(window_start, window_end)
    send = send or request_for_task(client, config, "classification")

    async def worker(worker_id: int) -> None:
        k = worker_id
        while True:
            started = clock()
            if started >= window_end:
                return
            payload = batches[k % len(batches)]
            k += concurrency
            try:
                await send(payload)
                ok, code = True, "OK"
            except ImgserveError as exc:
                ok, code = False, exc.code
            rec.record(started, clock(), len(payload), None if ok else code)

    shown = 0

    def show(now: float) -> None:
        nonlocal shown
        step = int((min(now, window_end) - start) * 10) - shown  # the bar counts tenths of a second
        if step > 0:
            progress.update(step)
            shown += step
        state = "warm-up" if now < window_start else f"ok={len(rec.latencies)} err={sum(rec.errors.values())}"
        progress.set_postfix_str(state, refresh=False)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(0.25)
            show(clock())

    tick = asyncio.create_task(ticker()) if progress is not None else None
    try:
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    finally:
        if tick is not None:
            tick.cancel()
            await asyncio.gather(tick, return_exceptions=True)
            show(window_end)
            progress.refresh()
            progress.close()
    latencies, elapsed = rec.latencies, rec.elapsed_s
    return StepResult(
        concurrency=concurrency, requests=len(latencies), images=rec.images, errors=rec.errors,
        elapsed_s=elapsed, requests_per_s=len(latencies) / elapsed, images_per_s=rec.images / elapsed,
        latency=LatencySummary.from_seconds(latencies), client_cpu_s=time.process_time() - cpu_start,
        warmup_requests=rec.warmup_requests, drained=rec.drained,
    )


def tqdm_progress(config: BenchConfig) -> ProgressFactory:
    """A factory of per-step tqdm bars on stderr that count seconds of the step."""
    from tqdm import tqdm

    total = int(round((config.warmup_s + config.duration_s) * 10))

    def make(concurrency: int) -> Any:
        return tqdm(total=total, desc=f"concurrency {concurrency:>4}", unit="ds", leave=True, file=sys.stderr,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")
    return make


async def preflight(send: RequestFn, batches: Sequence[Sequence[bytes]]) -> None:
    """Fail fast (with the server's own error) before a sweep that could only produce errors."""
    await send(batches[0])


async def run_sweep(config: BenchConfig, images: Sequence[bytes] | None = None, *,
                    image_source: str = "", progress: ProgressFactory | None = None,
                    client_options: Mapping[str, Any] | None = None) -> BenchReport:
    """Run every concurrency step of ``config`` and return the report.

    ``images`` None means synthetic noise images sized for the model (its resize side).
    ``client_options`` (token, TLS files) go to the client only, never into the report.
    Retries are off: the bench measures what the gateway answers, not what a retrying client hides.
    Raises ImgserveError when the preflight request fails.
    """
    options = {**(client_options or {}), "protocol": config.protocol, "retries": 0}
    async with AsyncImageClient(config.server, **options) as client:
        info = await client.model(config.model, timeout=config.timeout_s)
        if images is None:
            images = synthetic_images(max(16, config.batch), info.resize or info.crop or 224, info.channels)
            image_source = image_source or f"synthetic noise, {info.resize}x{info.resize}x{info.channels}"
        batches = make_batches(images, config.batch)
        send = request_for_task(client, config, info.task)
        await preflight(send, batches)
        report = BenchReport(
            config=config, environment=environment(), model=info.to_dict(),
            images={"source": image_source, "count": len(images),
                    "mean_bytes": round(sum(map(len, images)) / len(images), 1)},
        )
        for c in config.concurrency:
            bar = progress(c) if progress is not None else None
            report.steps.append(await run_step(client, config, batches, c, bar, send))
        return report


# ---------------------------------------------------------------- output

def format_table(report: BenchReport) -> str:
    """A fixed-width table of the sweep, one row per concurrency level."""
    head = (f"{'conc':>5} {'req/s':>9} {'img/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p95 ms':>8} "
            f"{'p99 ms':>8} {'requests':>9} {'errors':>7}")
    lines = [head, "-" * len(head)]
    for s in report.steps:
        lat = s.latency
        cells = [f"{v:8.2f}" for v in (lat.p50_ms, lat.p90_ms, lat.p95_ms, lat.p99_ms)] if lat else ["       -"] * 4
        lines.append(f"{s.concurrency:>5} {s.requests_per_s:9.1f} {s.images_per_s:9.1f} {' '.join(cells)} "
                     f"{s.requests:>9} {s.error_count:>7}")
    errors = Counter()
    for s in report.steps:
        errors.update(s.errors)
    if errors:
        lines.append("errors by code: " + ", ".join(f"{k}={v}" for k, v in sorted(errors.items())))
    return "\n".join(lines)


def title_for(c: BenchConfig) -> str:
    """One line naming what was measured (plot title, log line)."""
    crop = {None: "model default", True: "on", False: "off"}[c.ten_crop]
    parts = [c.model, c.protocol, f"batch {c.batch}", f"TTA {crop}"]
    if c.label:
        parts.insert(0, c.label)
    return " | ".join(parts)


def plot(report: BenchReport, path: str | Path) -> Path:
    """Throughput and p50/p99 latency against concurrency, as a PNG (matplotlib, imported lazily)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    steps = report.steps
    conc = [s.concurrency for s in steps]
    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_t.plot(conc, [s.images_per_s for s in steps], "o-", label="images/s")
    if report.config.batch > 1:
        ax_t.plot(conc, [s.requests_per_s for s in steps], "s--", label="requests/s")
    ax_t.set_ylabel("throughput")
    ax_t.set_ylim(bottom=0)
    ax_t.legend()
    for name, attr in (("p50", "p50_ms"), ("p99", "p99_ms")):
        ax_l.plot(conc, [getattr(s.latency, attr) if s.latency else float("nan") for s in steps], "o-", label=name)
    ax_l.set_ylabel("latency (ms)")
    ax_l.set_ylim(bottom=0)
    ax_l.legend()
    for ax, name in ((ax_t, "Throughput"), (ax_l, "Latency")):
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_title(name)
        if len(set(conc)) > 1 and max(conc) / min(conc) >= 8:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.grid(True, alpha=0.3)
    fig.suptitle(title_for(report.config))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
