"""``imgserve serve --workers N``: shared ports, one merged /metrics, restart on crash, clean SIGTERM.

A real supervisor and real worker processes over the tiny ONNX repository. Requests go
over many separate gRPC connections (the kernel spreads connections, not requests, over
SO_REUSEPORT listeners), and each worker's prometheus files show it served some.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from serving.settings import Settings
from serving.workers import worker_argv
from tests.fakes import grey_png
from tests.procs import imgserve_executable
from tests.tiny_onnx import tiny_onnx_repository

pytestmark = pytest.mark.timeout(240)

CONNECTIONS = 16   # each lands on one of two workers: all on one has odds 2 ** -15


def children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(p) for p in (task / "children").read_text().split()}
    return found


def wait_for(predicate, what: str, timeout_s: float = 90.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


async def classify_over_connections(target: str, rounds: int) -> int:
    from tritonclient.grpc import InferInput, InferRequestedOutput
    from tritonclient.grpc.aio import InferenceServerClient

    clients = [InferenceServerClient(target, channel_args=[("grpc.use_local_subchannel_pool", 1)])
               for _ in range(CONNECTIONS)]
    tensor = InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([grey_png(9)], dtype=np.object_))
    try:
        for _ in range(rounds):
            answers = await asyncio.gather(*(c.infer("tiny", [tensor], outputs=[InferRequestedOutput("probabilities")])
                                             for c in clients))
            assert all(a.as_numpy("probabilities").shape == (1, 3) for a in answers)
    finally:
        for c in clients:
            await c.close()
    return rounds * CONNECTIONS


def metric(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_worker_flags_split_the_cores_and_win_over_the_users() -> None:
    settings = Settings(workers=4)
    argv = worker_argv(["--workers", "4", "--grpc-port", "0"], settings, 9000, 9001, 4)
    assert argv[argv.index("serve") + 1:argv.index("serve") + 5] == ["--workers", "4", "--grpc-port", "0"]
    tail = argv[argv.index("serve") + 5:]
    assert tail[:8] == ["--workers", "1", "--reuse-port", "true", "--grpc-port", "9000", "--http-port", "9001"]
    share = str(max(1, settings.cores // 4))
    assert tail[8:] == ["--preprocess-threads", share, "--backend-threads", share]
    assert "--preprocess-threads" not in worker_argv([], Settings(workers=2, preprocess_threads=3), 1, 2, 2)


def test_two_workers_share_ports_metrics_and_stop_cleanly(tmp_path: Path) -> None:
    repo = tiny_onnx_repository(tmp_path)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    out = (tmp_path / "out.log").open("w+")
    proc = subprocess.Popen([str(imgserve_executable()), "serve", "--model-repository", str(repo), "--host", "127.0.0.1",
                             "--grpc-port", "0", "--http-port", "0", "--workers", "2", "--shutdown-grace-s", "5"],
                            stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    try:
        wait_for(lambda: "metrics: http" in Path(out.name).read_text() or proc.poll() is not None, "the banner")
        banner = Path(out.name).read_text()
        assert proc.poll() is None, banner
        assert banner.count("imgserve gateway is serving") == 1 and "2 workers" in banner
        grpc_port = re.search(r"gRPC:\s+\S+:(\d+)", banner).group(1)
        http_port = re.search(r"HTTP:\s+http://\S+:(\d+)", banner).group(1)
        workers = children(proc.pid)
        assert len(workers) == 2

        sent = asyncio.run(classify_over_connections(f"127.0.0.1:{grpc_port}", rounds=3))
        for pid in workers:                                    # both took connections and answered
            assert (metrics_dir / f"histogram_{pid}.db").exists(), sorted(os.listdir(metrics_dir))
        text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=30).read().decode()
        counted = metric(text, "imgserve_request_duration_seconds_count")
        assert counted >= sent                                 # one view: every worker's requests
        assert metric(text, "imgserve_backend_up") == 1.0      # livemin over two ready workers
        assert "imgserve_queue_depth" in text

        victim = min(workers)                                  # a crashed worker is replaced
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(children(proc.pid) - {victim}) == 2, "a replacement worker")
        replacement = (children(proc.pid) - workers).pop()
        wait_for(lambda: (metrics_dir / f"gauge_livesum_{replacement}.db").exists()
                 or (metrics_dir / f"gauge_livemin_{replacement}.db").exists(), "the replacement serving")
        assert asyncio.run(classify_over_connections(f"127.0.0.1:{grpc_port}", rounds=1)) == CONNECTIONS
        assert not (metrics_dir / f"gauge_livesum_{victim}.db").exists()   # its live gauges were retired

        remaining = children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert all(not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
                   for pid in remaining)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
