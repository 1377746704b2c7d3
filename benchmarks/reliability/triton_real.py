"""A real Triton under SIGSTOP and SIGKILL while the gateway serves load through it.

Why: the "Triton" figures of docs/reliability.md were first measured over the in-process fake
(tests/fake_triton.py), which hangs and stops on command but is not a tritonserver. Here
``imgserve triton-local`` (the command, as a user runs it) starts a real tritonserver 2.51
over the repository; ``imgserve serve --backend triton`` sits in front; N concurrent SDK
clients (AsyncImageClient over gRPC, no SDK retries, so each call's outcome is seen) send
Classify with a deadline. Then:

1. **SIGSTOP** the tritonserver process (the child of the triton-local wrapper, found in
   /proc) for ``stop_s``, then SIGCONT.
2. **SIGKILL** it. The wrapper notices, cleans up and exits; after ``down_s`` triton-local
   is started again on the same ports.

Measured per fault: requests past their deadline (latency over the deadline + 50 ms), the
UNAVAILABLE latency p99 after the gateway first answered UNAVAILABLE (detection) while
Triton was down, and recovery: from Triton being ready again (SIGCONT; the restarted
triton-local printing "ready") to the first OK answer.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from benchmarks.reliability.images import percentile

READY = re.compile(r"triton-local ready in [\d.]+s: grpc (\S+)\s+http (\S+)\s+metrics (\S+)")
PAST_DEADLINE_SLACK_S = 0.05


@dataclass
class TritonLocalProcess:
    """A running ``imgserve triton-local`` wrapper and where its tritonserver listens."""

    proc: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    metrics_port: int
    log: IO[bytes]
    ready_at: float

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def tritonserver_pid(self) -> int:
        """The tritonserver process under the wrapper (its child named tritonserver)."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            if ppid == self.proc.pid and comm.startswith("tritonserver"):
                return int(entry.name)
        raise RuntimeError(f"no tritonserver child of triton-local (pid {self.proc.pid})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_triton_local(repo: Path, work_dir: Path, ports: tuple[int, int, int] = (0, 0, 0),
                       timeout_s: float = 180.0) -> TritonLocalProcess:
    """``imgserve triton-local`` as a subprocess; returns once it printed its ready line."""
    from tests.procs import imgserve_executable

    log = tempfile.NamedTemporaryFile(prefix="triton-local-", suffix=".log")  # noqa: SIM115 - kept with the process
    args = [str(imgserve_executable()), "triton-local", "--model-repository", str(repo), "--work-dir", str(work_dir),
            "--grpc-port", str(ports[0]), "--http-port", str(ports[1]), "--metrics-port", str(ports[2]),
            "--startup-timeout", str(timeout_s)]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s + 10
    while time.monotonic() < deadline:
        text = Path(log.name).read_text(errors="replace")
        found = READY.search(text)
        if found:
            grpc_port = int(found.group(1).rsplit(":", 1)[1])
            http_port = int(found.group(2).rsplit(":", 1)[1])
            metrics_port = int(found.group(3).split(":")[2].split("/")[0])
            return TritonLocalProcess(proc, grpc_port, http_port, metrics_port, log, time.monotonic())
        if proc.poll() is not None:
            raise RuntimeError(f"triton-local exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError(f"triton-local not ready after {timeout_s:.0f} s")


@contextmanager
def _stopping(holder: list[TritonLocalProcess]) -> Iterator[None]:
    try:
        yield
    finally:
        for t in holder:
            t.stop()


async def triton_faults_real(repo: Path, model: str, image: bytes, *, clients: int = 8, load_s: float = 2.0,
                             stop_s: float = 3.0, down_s: float = 2.0, deadline_s: float = 5.0,
                             gateway_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """SIGSTOP then SIGKILL a real tritonserver under load; the figures per fault (see the module doc)."""
    from clients.sdk import ImgserveError
    from clients.sdk.aio import AsyncImageClient
    from tests.procs import run_gateway

    samples: list[tuple[float, float, str]] = []     # (sent, latency, code)
    marks: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as work:
        holder = [start_triton_local(repo, Path(work) / "triton")]
        with _stopping(holder):
            first = holder[0]
            ports = (first.grpc_port, first.http_port, first.metrics_port)
            with run_gateway(repo, backend="triton", triton_url=first.grpc_url, extra_args=list(gateway_args)) as gw:
                stop = asyncio.Event()

                async def client() -> None:
                    async with AsyncImageClient(gw.grpc_target, timeout=deadline_s, retries=0) as sdk:
                        while not stop.is_set():
                            sent = time.monotonic()
                            try:
                                await sdk.classify(image, model, top_k=1)
                                code = "OK"
                            except ImgserveError as exc:
                                code = exc.code
                            samples.append((sent, time.monotonic() - sent, code))
                            await asyncio.sleep(0.01)

                async def recovered(since: float, limit_s: float = 30.0) -> None:
                    end = time.monotonic() + limit_s
                    while time.monotonic() < end:
                        if any(s[0] + s[1] >= since and s[2] == "OK" for s in samples[-4 * clients:]):
                            return
                        await asyncio.sleep(0.02)

                tasks = [asyncio.create_task(client()) for _ in range(clients)]
                await asyncio.sleep(load_s)
                # ---- SIGSTOP: hung, connections open
                pid = first.tritonserver_pid()
                marks["stop"] = time.monotonic()
                os.kill(pid, signal.SIGSTOP)
                await asyncio.sleep(stop_s)
                os.kill(pid, signal.SIGCONT)
                marks["cont"] = time.monotonic()
                await recovered(marks["cont"])
                await asyncio.sleep(load_s)
                # ---- SIGKILL, then triton-local again on the same ports
                pid = first.tritonserver_pid()
                marks["kill"] = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                await asyncio.to_thread(first.proc.wait, 60)      # the wrapper cleans up and exits 1
                marks["wrapper_exit"] = time.monotonic()
                await asyncio.sleep(max(0.0, down_s - (time.monotonic() - marks["kill"])))
                marks["restart"] = time.monotonic()
                second = await asyncio.to_thread(start_triton_local, repo, Path(work) / "triton", ports)
                holder.append(second)
                marks["ready"] = second.ready_at
                await recovered(marks["ready"])
                await asyncio.sleep(load_s)
                stop.set()
                await asyncio.gather(*tasks)
                gateway_log = gw.stderr()

    def phase(fault_at: float, back_at: float) -> dict[str, Any]:
        window = [s for s in samples if fault_at <= s[0] < back_at]
        failures = [s for s in samples if s[0] >= fault_at and s[0] + s[1] >= fault_at and s[2] != "OK"]
        detected = min((s[0] + s[1] for s in failures), default=None)
        after = [s for s in window if detected is not None and s[0] >= detected and s[2] == "UNAVAILABLE"]
        first_ok = min((s[0] + s[1] for s in samples if s[0] + s[1] >= back_at and s[2] == "OK"
                        and s[0] >= fault_at), default=None)
        return {"requests_while_down": len(window), "codes_while_down": dict(Counter(s[2] for s in window)),
                "detected_after_s": None if detected is None else round(detected - fault_at, 2),
                "unavailable_p99_ms_after_detection": round(percentile([s[1] for s in after], 99) * 1000, 1),
                "unavailable_max_ms_after_detection": round(max((s[1] for s in after), default=0.0) * 1000, 1),
                "slowest_failure_ms": round(max((s[1] for s in failures if s[0] < back_at), default=0.0) * 1000, 1),
                "recovery_s": None if first_ok is None else round(first_ok - back_at, 2)}

    return {"clients": clients, "deadline_s": deadline_s, "requests": len(samples),
            "codes": dict(Counter(s[2] for s in samples)),
            "past_deadline": sum(1 for s in samples if s[1] > deadline_s + PAST_DEADLINE_SLACK_S),
            "deadline_exceeded": sum(1 for s in samples if s[2] == "DEADLINE_EXCEEDED"),
            "not_found": sum(1 for s in samples if s[2] == "NOT_FOUND"),
            "SIGSTOP": {"stopped_s": stop_s, **phase(marks["stop"], marks["cont"])},
            "SIGKILL": {"down_s": round(marks["ready"] - marks["kill"], 2),
                        "triton_local_restart_to_ready_s": round(marks["ready"] - marks["restart"], 2),
                        **phase(marks["kill"], marks["ready"])},
            "gateway_breaker_lines": [line.split(" ", 2)[-1][:160] for line in gateway_log.splitlines()
                                      if "circuit breaker" in line][:8]}


def tiny_repository(repo: Path) -> tuple[str, bytes]:
    """A tiny real ONNX classifier (benchmarks/reliability/tinymodel.py) and an image for it."""
    from benchmarks.reliability.tinymodel import add_version
    from tests.fakes import grey_png, tiny_spec

    add_version(repo, tiny_spec())
    return "tiny", grey_png(7)


if __name__ == "__main__":
    import json

    with tempfile.TemporaryDirectory() as tmp:
        name, img = tiny_repository(Path(tmp))
        print(json.dumps(asyncio.run(triton_faults_real(Path(tmp), name, img, clients=int(sys.argv[1]) if len(sys.argv) > 1
                                                        else 8)), indent=2))
