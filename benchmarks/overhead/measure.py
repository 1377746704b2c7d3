"""Per-request cost of the gateway: req/s, latency, and the gateway's own CPU time per request.

On a shared machine, wall-clock throughput moves with everyone else's load; the CPU
seconds the gateway process (all its threads) spends per request do not, much. So each
optimisation step of issue #11 is judged by ``cpu_ms_per_request`` first, req/s second.

    python benchmarks/overhead/measure.py --model-repository REPO --model lenet5 -c 32 -d 10 \
        [--gateway-args '--workers 2'] [--profile out.txt]      # py-spy raw (collapsed) stacks

It starts ``imgserve serve`` (embedded backend), warms up, drives it with
tritonclient.grpc.aio (one PNG per request to the v2 endpoint, as ``imgserve bench
--compare`` does) and prints one JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from serving.compare.paths import GatewayPath
from serving.compare.payloads import synthetic_images
from serving.compare.servers import GatewayProcess
from serving.repository import read_model

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process and its reaped-or-live children (worker processes included)."""
    total = 0.0
    pids = [pid] + [int(p) for p in _children(pid)]
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def _children(pid: int) -> list[str]:
    out: list[str] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids = (task / "children").read_text().split() if (task / "children").exists() else []
        for k in kids:
            out += [k, *_children(int(k))]
    return out


async def drive(url: str, repo: Path, model: str, concurrency: int, duration: float, warmup: float,
                pid: int, profile: Path | None, native: bool, connections: int = 1) -> dict:
    spec = read_model(repo / model).spec
    images = synthetic_images(16, spec.preprocess.resize, spec.preprocess.channels)
    path = GatewayPath(url, connections=connections)
    await path.open(spec, images)
    await path.step(concurrency, 0.0, warmup)                  # warm up (unrecorded)
    spy = None
    if profile is not None:
        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid),
                                "--duration", str(int(duration)), "--rate", "250", "--format", "raw",
                                "--threads", "--nonblocking", "--subprocesses", *(["--native"] if native else []),
                                "-o", str(profile)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cpu0, client0 = cpu_seconds(pid), time.process_time()
    window = await path.step(concurrency, 0.0, duration)
    cpu1, client1 = cpu_seconds(pid), time.process_time()
    await path.close()
    if spy is not None:
        spy.wait(60)
    stats = window.stats("gateway", model, spec.preprocess.resize, concurrency, 0, 0.0)
    return {"model": model, "concurrency": concurrency, "requests": stats.images,
            "req_per_s": round(stats.images_per_s, 1),
            "p50_ms": round(stats.latency.p50_ms, 2), "p99_ms": round(stats.latency.p99_ms, 2),
            "errors": stats.errors,
            "gateway_cpu_ms_per_request": round((cpu1 - cpu0) * 1000 / max(1, stats.images), 3),
            "gateway_cores_used": round((cpu1 - cpu0) / stats.elapsed_s, 2),
            # the load generator (this process) shares the machine: its CPU is part of the budget too
            "client_cpu_ms_per_request": round((client1 - client0) * 1000 / max(1, stats.images), 3),
            "load_average_1m": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model-repository", type=Path, required=True)
    p.add_argument("--model", default="lenet5")
    p.add_argument("-c", "--concurrency", type=int, default=32)
    p.add_argument("-d", "--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--gateway-args", default="")
    p.add_argument("--profile", type=Path)
    p.add_argument("--native", action="store_true")
    p.add_argument("--label", default="")
    p.add_argument("--connections", type=int, default=1, help="gRPC connections (use >= 2 x workers)")
    p.add_argument("--gateway-pythonpath", default=None,
                   help="PYTHONPATH for the gateway process only (e.g. another checkout, for a before/after)")
    args = p.parse_args()
    if args.gateway_pythonpath is not None:
        os.environ["PYTHONPATH"] = args.gateway_pythonpath   # inherited by the gateway; this process is loaded
    with GatewayProcess(args.model_repository, args=shlex.split(args.gateway_args)) as gw:
        assert gw.proc is not None
        result = asyncio.run(drive(gw.grpc_url, args.model_repository, args.model, args.concurrency,
                                   args.duration, args.warmup, gw.proc.pid, args.profile, args.native,
                                   args.connections))
    result["label"] = args.label
    result["gateway_args"] = args.gateway_args
    result["connections"] = args.connections
    print(json.dumps(result))


if __name__ == "__main__":
    main()
