"""Real gateway processes for end-to-end tests.

``run_gateway`` starts ``.venv/bin/imgserve serve`` as a subprocess on free
loopback ports, waits until gRPC health says SERVING (showing the process's
stderr if it dies or never gets there), and stops it with SIGTERM.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0


def imgserve_executable() -> Path:
    """The venv's ``imgserve`` script (next to the running interpreter, else the repo's .venv)."""
    for candidate in (Path(sys.executable).parent / "imgserve", ROOT / ".venv" / "bin" / "imgserve"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("no imgserve executable; run `make install` first")


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class GatewayProcess:
    """A running gateway: where to reach it, the Popen, and its captured output."""

    grpc_target: str
    http_url: str
    proc: subprocess.Popen[bytes]
    stdout_file: IO[bytes] = field(repr=False)
    stderr_file: IO[bytes] = field(repr=False)

    def stdout(self) -> str:
        return _read(self.stdout_file)

    def stderr(self) -> str:
        return _read(self.stderr_file)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM and wait; SIGKILL (and fail loudly) if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"gateway did not exit {timeout_s:.0f} s after SIGTERM; stderr:\n"
                                   f"{self.stderr()[-4000:]}") from None
        return int(self.proc.returncode)


def _read(f: IO[bytes]) -> str:
    f.flush()
    with open(f.name, "rb") as again:
        return again.read().decode("utf-8", errors="replace")


def health_status(target: str, service: str = "", timeout_s: float = 1.0) -> int | None:
    """The grpc.health.v1 status of ``service`` at ``target`` (None when unreachable)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s).status
        except grpc.RpcError:
            return None


def wait_serving(gw: GatewayProcess, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not gw.alive():
            raise RuntimeError(f"gateway exited with {gw.proc.returncode} before serving; stderr:\n"
                               f"{gw.stderr()[-4000:]}")
        if health_status(gw.grpc_target) == health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(0.1)
    raise TimeoutError(f"gateway not SERVING after {timeout_s:.0f} s; stderr:\n{gw.stderr()[-4000:]}")


class PortCollision(RuntimeError):
    """The ports free_port() picked were taken before the gateway bound them."""


def _start(repo: Path, backend: str, triton_url: str | None, extra_args: Sequence[str],
           env: dict[str, str] | None, start_timeout_s: float,
           out: IO[bytes], err: IO[bytes]) -> GatewayProcess:
    grpc_port, http_port = free_port(), free_port()
    while http_port == grpc_port:
        http_port = free_port()
    args = [str(imgserve_executable()), "serve", "--model-repository", str(repo), "--backend", backend,
            "--host", "127.0.0.1", "--grpc-port", str(grpc_port), "--http-port", str(http_port)]
    if triton_url:
        args += ["--triton-url", triton_url]
    args += list(extra_args)
    proc_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    out.seek(0), out.truncate()
    err.seek(0), err.truncate()
    proc = subprocess.Popen(args, stdout=out, stderr=err, env=proc_env, cwd=ROOT)
    gw = GatewayProcess(grpc_target=f"127.0.0.1:{grpc_port}", http_url=f"http://127.0.0.1:{http_port}",
                        proc=proc, stdout_file=out, stderr_file=err)
    try:
        wait_serving(gw, start_timeout_s)
    except RuntimeError:
        if gw.proc.poll() is not None and "cannot listen" in gw.stderr():
            raise PortCollision(gw.stderr()[-2000:]) from None
        raise
    except BaseException:
        if gw.alive():
            gw.proc.kill()
            gw.proc.wait()
        raise
    return gw


@contextmanager
def run_gateway(repo: Path, *, backend: str = "onnxruntime", triton_url: str | None = None,
                extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
                start_timeout_s: float = START_TIMEOUT_S) -> Iterator[GatewayProcess]:
    """Start a real ``imgserve serve`` on free ports; yield it once SERVING; SIGTERM it afterwards.

    If another process grabs a picked port before the gateway binds it, the start is
    retried on fresh ports (the gateway refuses shared ports, so this is detectable).
    """
    with tempfile.NamedTemporaryFile(prefix="imgserve-out-", suffix=".log") as out, \
            tempfile.NamedTemporaryFile(prefix="imgserve-err-", suffix=".log") as err:
        for attempt in range(3):
            try:
                gw = _start(repo, backend, triton_url, extra_args, env, start_timeout_s, out, err)
                break
            except PortCollision:
                if attempt == 2:
                    raise
        try:
            yield gw
        finally:
            if gw.alive():
                gw.stop()


# ---------------------------------------------------------------- Triton (appended by the triton helper)

from typing import TYPE_CHECKING  # noqa: E402 - kept with the appended section

if TYPE_CHECKING:
    from serving.triton_local import TritonLocal

TRITON_START_TIMEOUT_S = 180.0   # Triton + one python stub per model; generous for a busy 2-core machine


@contextmanager
def run_triton_local(repo: Path, *, start_timeout_s: float = TRITON_START_TIMEOUT_S,
                     work_dir: Path | None = None) -> Iterator[TritonLocal]:
    """A real tritonserver (``serving.triton_local.TritonLocal``) over ``repo`` on free loopback ports.

    Yields the running server: ``.grpc_url`` ("127.0.0.1:PORT"), ``.http_url``
    ("http://127.0.0.1:PORT"), ``.metrics_url`` (the full ".../metrics" URL to
    scrape), ``.proc``. Stopped with SIGTERM afterwards (no process or /dev/shm
    region is left); a test may stop it earlier with ``.stop()``.
    """
    from serving.triton_local import TritonLocal  # noqa: PLC0415 - only Triton tests pay for it

    server = TritonLocal(repo, startup_timeout_s=start_timeout_s, work_dir=work_dir)
    with server:
        yield server
