"""Real gateway processes for end-to-end tests.

``run_gateway`` starts ``.venv/bin/imgserve serve`` as a subprocess on loopback
ports the OS picks (port 0, read back from its start banner), waits until gRPC
health says SERVING (showing the process's stderr if it dies or never gets
there), and stops it with SIGTERM.
"""
from __future__ import annotations

import os
import re
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


BANNER_GRPC = re.compile(r"^\s*gRPC:\s+\S+:(\d+)\s", re.M)
BANNER_HTTP = re.compile(r"^\s*HTTP:\s+http://\S+:(\d+)\s", re.M)


def announced_ports(proc: subprocess.Popen[bytes], out: IO[bytes], err: IO[bytes],
                    timeout_s: float) -> tuple[int, int]:
    """(gRPC, HTTP) ports from the start banner of a gateway started with ``--grpc-port 0 --http-port 0``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        banner = _read(out)
        grpc_port, http_port = BANNER_GRPC.search(banner), BANNER_HTTP.search(banner)
        if grpc_port and http_port:
            return int(grpc_port.group(1)), int(http_port.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode} before serving; stderr:\n{_read(err)[-4000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"gateway printed no start banner after {timeout_s:.0f} s; stderr:\n{_read(err)[-4000:]}")


@contextmanager
def run_gateway(repo: Path, *, backend: str = "onnxruntime", triton_url: str | None = None,
                extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
                start_timeout_s: float = START_TIMEOUT_S) -> Iterator[GatewayProcess]:
    """Start a real ``imgserve serve``; yield it once SERVING; SIGTERM it afterwards.

    The gateway binds port 0 for both servers (the OS picks free ports as it binds) and the
    ports are read back from its start banner, so no other process can take them first.
    """
    args = [str(imgserve_executable()), "serve", "--model-repository", str(repo), "--backend", backend,
            "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0"]
    if triton_url:
        args += ["--triton-url", triton_url]
    args += list(extra_args)
    # no drain delay unless a test asks: nothing balances load in front of a test's gateway
    proc_env = {"IMGSERVE_DRAIN_DELAY_S": "0", **os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with tempfile.NamedTemporaryFile(prefix="imgserve-out-", suffix=".log") as out, \
            tempfile.NamedTemporaryFile(prefix="imgserve-err-", suffix=".log") as err:
        began = time.monotonic()
        proc = subprocess.Popen(args, stdout=out, stderr=err, env=proc_env, cwd=ROOT)
        try:
            grpc_port, http_port = announced_ports(proc, out, err, start_timeout_s)
            gw = GatewayProcess(grpc_target=f"127.0.0.1:{grpc_port}", http_url=f"http://127.0.0.1:{http_port}",
                                proc=proc, stdout_file=out, stderr_file=err)
            wait_serving(gw, max(1.0, start_timeout_s - (time.monotonic() - began)))
        except BaseException:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise
        try:
            yield gw
        finally:
            if gw.alive():
                gw.stop()


@contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port where connections are refused, held for the test (bound, never listening).

    A port that was merely free a moment ago could be taken by another process and answer.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


# ---------------------------------------------------------------- Triton (appended by the triton helper)

from typing import TYPE_CHECKING  # noqa: E402 - kept with the appended section

if TYPE_CHECKING:
    from serving.settings import Settings
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


def triton_settings(urls: str, repo: Path, **overrides: object) -> Settings:
    """Gateway settings for the Triton backend at ``urls`` (health probes every 0.3 s unless overridden)."""
    from serving.settings import Settings  # noqa: PLC0415 - only Triton tests pay for it

    settings = Settings(backend="triton", triton_url=urls, model_repository=repo, triton_health_interval_s=0.3)
    for key, value in overrides.items():
        setattr(settings, key, value)
    settings.validate()
    return settings
