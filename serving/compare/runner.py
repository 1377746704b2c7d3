"""Run a comparison: start the servers once, then interleave every path round after round.

Interleaving is the point: on a shared or thermally throttled machine the conditions
drift, and measuring path A for a minute and then path B for a minute would turn that
drift into a false ratio. Here each (model, image size, concurrency) cell runs every
path back to back, in an order rotated each round, and ratios are taken within a round
before they are summarised over rounds (median, with the min-max spread).
"""
from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from serving.compare import paths as P
from serving.compare.payloads import synthetic_images
from serving.compare.servers import GatewayProcess
from serving.repository import ModelSpec, scan_repository

# path -> (numerator path, denominator path, ratio name): the ratios a reader decides by
RATIOS: tuple[tuple[str, str, str], ...] = (
    (P.GATEWAY, P.ORT, "gateway/ort"),
    (P.GATEWAY, P.TRITON, "gateway/triton"),
    (P.GATEWAY_TRITON, P.TRITON, "gateway-triton/triton"),
    (P.TRITON, P.ORT, "triton/ort"),
    (P.GATEWAY, P.GATEWAY_TEN_CROP, "10crop-cost"),   # how many single-crop requests one 10-crop one costs
)


@dataclass(frozen=True)
class CompareConfig:
    model_repository: Path
    models: tuple[str, ...]
    concurrency: tuple[int, ...] = (1, 8, 32)
    image_sizes: tuple[int, ...] = (0,)        # 0: each model's own resize side
    paths: tuple[str, ...] = P.ALL_PATHS
    rounds: int = 3
    warmup_s: float = 1.0
    duration_s: float = 5.0
    image_format: str = "PNG"
    image_count: int = 16
    gateway_args: tuple[str, ...] = ()       # extra `imgserve serve` flags for both gateways
    connections: int = 1                     # gRPC connections per server path (>1 for `--workers N`)

    def __post_init__(self) -> None:
        unknown = [p for p in self.paths if p not in P.ALL_PATHS + P.OPTIONAL_PATHS]
        if unknown:
            raise ValueError(f"unknown paths {unknown}; choose from {', '.join(P.ALL_PATHS + P.OPTIONAL_PATHS)}")
        if not self.models or not self.paths or not self.concurrency:
            raise ValueError("at least one model, path and concurrency level")
        if self.rounds < 1 or self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError("rounds >= 1, duration > 0 and warm-up >= 0")


@dataclass
class CellSummary:
    """One (model, size, concurrency, path) summarised over rounds."""

    model: str
    image_size: int
    concurrency: int
    path: str
    images_per_s: dict[str, float]            # median, min, max over rounds
    p50_ms: dict[str, float]
    p99_ms: dict[str, float]
    errors: int
    rounds: int
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)   # name -> median/min/max of per-round ratios
    drained: int = 0                          # rounds where no request finished inside the window


def spread(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values))}


def summarise(steps: Sequence[P.StepStats]) -> list[CellSummary]:
    """Per-cell medians and spreads, and the per-round ratios between paths of the same cell."""
    cells: dict[tuple[str, int, int], dict[str, list[P.StepStats]]] = {}
    for s in steps:
        cells.setdefault((s.model, s.image_size, s.concurrency), {}).setdefault(s.path, []).append(s)
    out: list[CellSummary] = []
    for (model, size, conc), by_path in cells.items():
        for path, runs in by_path.items():
            lat = [r.latency for r in runs if r.latency is not None]
            summary = CellSummary(model=model, image_size=size, concurrency=conc, path=path,
                                  images_per_s=spread([r.images_per_s for r in runs]),
                                  p50_ms=spread([x.p50_ms for x in lat]), p99_ms=spread([x.p99_ms for x in lat]),
                                  errors=sum(sum(r.errors.values()) for r in runs), rounds=len(runs),
                                  drained=sum(r.drained for r in runs))
            for num, den, name in RATIOS:
                if path != num or den not in by_path:
                    continue
                by_round = {r.round: r.images_per_s for r in by_path[den]}
                ratios = [r.images_per_s / by_round[r.round] for r in runs if by_round.get(r.round)]
                if ratios:
                    summary.ratios[name] = spread(ratios)
            out.append(summary)
    return out


def repository_view(repo: Path, models: Sequence[str], into: Path) -> Path:
    """A repository holding only ``models`` (symlinks): servers load just what is measured."""
    view = into / "repository"
    view.mkdir()
    for name in models:
        (view / name).symlink_to((repo / name).resolve(), target_is_directory=True)
    return view


def size_of(spec: ModelSpec, size: int) -> int:
    return size or spec.preprocess.resize or spec.preprocess.crop


Progress = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@contextlib.contextmanager
def servers(config: CompareConfig, repo: Path) -> Iterator[dict[str, str]]:
    """Start what the chosen paths need; yields path -> gRPC address."""
    urls: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        if {P.GATEWAY, P.GATEWAY_TEN_CROP} & set(config.paths):
            gw = stack.enter_context(GatewayProcess(repo, args=config.gateway_args, label="gateway (embedded)"))
            urls[P.GATEWAY] = urls[P.GATEWAY_TEN_CROP] = gw.grpc_url
        if {P.TRITON, P.GATEWAY_TRITON} & set(config.paths):
            from serving.triton_local import TritonLocal

            triton = stack.enter_context(TritonLocal(repo, die_with_parent=False))
            urls[P.TRITON] = triton.grpc_url
            if P.GATEWAY_TRITON in config.paths:
                gwt = stack.enter_context(GatewayProcess(
                    repo, label="gateway (triton backend)",
                    args=("--backend", "triton", "--triton-url", triton.grpc_url, *config.gateway_args)))
                urls[P.GATEWAY_TRITON] = gwt.grpc_url
        yield urls


def make_path(name: str, urls: dict[str, str], model_dir: Path, connections: int = 1) -> P.MeasuredPath:
    if name == P.ORT:
        return P.OrtPath(model_dir)
    if name == P.TRITON:
        return P.TritonDirectPath(urls[name], connections)
    return P.GatewayPath(urls[name], name=name, ten_crop=(name == P.GATEWAY_TEN_CROP), connections=connections)


async def run_compare(config: CompareConfig, progress: Progress | None = _stderr) -> list[P.StepStats]:
    """Every path x model x size x concurrency, ``rounds`` times, interleaved; the raw per-round steps."""
    found = scan_repository(config.model_repository)
    missing = [m for m in config.models if m not in found]
    if missing:
        raise ValueError(f"models {missing} are not in {config.model_repository} (it has {', '.join(sorted(found))})")
    specs = {m: found[m].spec for m in config.models}
    say = progress or (lambda line: None)
    steps: list[P.StepStats] = []
    with tempfile.TemporaryDirectory(prefix="imgserve-compare-") as tmp:
        repo = repository_view(config.model_repository, config.models, Path(tmp))
        say(f"compare: starting servers for {', '.join(config.paths)}")
        with servers(config, repo) as urls:
            opened: dict[tuple[str, str, int], P.MeasuredPath] = {}
            payloads: dict[tuple[str, int], list[bytes]] = {}
            try:
                for rnd in range(config.rounds):
                    for model in config.models:
                        spec = specs[model]
                        for size in config.image_sizes:
                            side = size_of(spec, size)
                            images = payloads.get((model, side))
                            if images is None:   # the same images for every path and round
                                images = payloads[(model, side)] = synthetic_images(
                                    config.image_count, side, spec.preprocess.channels, fmt=config.image_format)
                            for conc in config.concurrency:
                                k = rnd % len(config.paths)
                                for name in config.paths[k:] + config.paths[:k]:
                                    key = (name, model, side)
                                    path = opened.get(key)
                                    if path is None:
                                        path = opened[key] = make_path(name, urls, repo / model, config.connections)
                                        await path.open(spec, images)
                                    cpu = _cpu()
                                    window = await path.step(conc, config.warmup_s, config.duration_s)
                                    stats = window.stats(name, model, side, conc, rnd, _cpu() - cpu)
                                    steps.append(stats)
                                    p50 = f"{stats.latency.p50_ms:.2f}" if stats.latency else "-"
                                    say(f"round {rnd + 1}/{config.rounds} {model} {side}px c={conc} {name:<15} "
                                        f"{stats.images_per_s:10.1f} img/s  p50 {p50} ms  "
                                        f"errors {sum(stats.errors.values())}")
            finally:
                for path in opened.values():
                    await path.close()
    return steps


def _cpu() -> float:
    return time.process_time()


def run(config: CompareConfig, progress: Progress | None = _stderr) -> list[P.StepStats]:
    return asyncio.run(run_compare(config, progress))
