"""The processes a comparison runs against: gateways (``imgserve serve``) on free ports.

Triton comes from ``serving.triton_local.TritonLocal``; this module adds the gateway
equivalent: start ``imgserve serve`` as a child process, wait until its Open Inference
Protocol endpoint says ready, and stop it with SIGTERM (a clean drain), so a
comparison never leaves a server behind.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


# the start banner of `imgserve serve` (serving/cli.py: announce) names the ports it bound
_BANNER = {"grpc": re.compile(rb"gRPC:\s+\S+:(\d+)"), "http": re.compile(rb"HTTP:\s+http://\S+:(\d+)")}


class ServerStartError(RuntimeError):
    """A server of the comparison did not come up; the message carries its log tail."""


class GatewayProcess:
    """``imgserve serve`` in a child process; a context manager.

    It binds port 0 and reads the ports back from its start banner, so no other process
    can take a port between choosing and binding it.
    """

    def __init__(self, model_repository: Path | str, *, args: Sequence[str] = (), label: str = "gateway",
                 startup_timeout_s: float = 120.0) -> None:
        self.model_repository = Path(model_repository)
        self.args = list(args)
        self.label = label
        self.startup_timeout_s = startup_timeout_s
        self.grpc_port = 0
        self.http_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()
        self._out = tempfile.TemporaryFile()

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "clients.cli", "serve", "--model-repository", str(self.model_repository),
                "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0",
                "--log-level", "WARNING", *self.args]

    def start(self) -> "GatewayProcess":
        import tritonclient.grpc as grpcclient

        self.proc = subprocess.Popen(self.command(), stdout=self._out, stderr=self._log,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        end = time.monotonic() + self.startup_timeout_s
        client = None
        try:
            while True:
                if self.proc.poll() is not None:
                    raise ServerStartError(f"{self.label} exited with status {self.proc.returncode}:\n{self.log_tail()}")
                if client is None and self._read_ports():
                    client = grpcclient.InferenceServerClient(self.grpc_url)
                try:
                    if client is not None and client.is_server_ready(client_timeout=2.0):
                        return self
                except Exception:  # not serving yet
                    pass
                if time.monotonic() > end:
                    self.stop()
                    raise ServerStartError(f"{self.label} not ready after {self.startup_timeout_s:.0f}s:\n"
                                           f"{self.log_tail()}")
                time.sleep(0.1)
        finally:
            if client is not None:
                client.close()

    def _read_ports(self) -> bool:
        self._out.seek(0)
        banner = self._out.read()
        found = {k: rx.search(banner) for k, rx in _BANNER.items()}
        if not all(found.values()):
            return False
        self.grpc_port, self.http_port = int(found["grpc"].group(1)), int(found["http"].group(1))
        return True

    def stop(self, timeout_s: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def log_tail(self, chars: int = 4000) -> str:
        self._log.seek(0)
        return self._log.read().decode("utf-8", errors="replace")[-chars:]

    def __enter__(self) -> "GatewayProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._log.close()
        self._out.close()
