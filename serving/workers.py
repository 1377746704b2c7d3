"""``imgserve serve --workers N``: N gateway processes on the same ports, one supervisor.

Why processes: one asyncio process runs its Python (gRPC handling, decoding glue,
batching) on one core at a time, because of the GIL. A GPU node has 16+ cores and a
GPU that wants thousands of images/s, so the gateway must spread over cores.

How:

* **Same ports.** Every worker binds the gRPC and HTTP ports with ``SO_REUSEPORT``
  (``grpc.so_reuseport`` and aiohttp's ``reuse_port``); the kernel spreads incoming
  connections over them. (A single gRPC client keeps one connection, so it talks to one
  worker; many clients spread.) Ports given as 0 are chosen here, once, for all.
* **One metrics view.** prometheus-client's multiprocess mode: every worker writes its
  samples to files in ``PROMETHEUS_MULTIPROC_DIR`` (a fresh directory per run unless set),
  and ``/metrics`` on any worker merges them (``MultiProcessCollector``); gauges declare
  how to merge (``livesum`` for queue depth and in-flight, ``livemin`` for backend up).
* **Cores split.** Unless set, each worker gets cores/N preprocessing and ONNX Runtime
  threads, so N workers do not oversubscribe the machine N times over.
* **Supervision.** Workers start together; the banner is printed once all are ready.
  A worker that dies is restarted (its live gauges are marked dead first); one that
  keeps dying at start stops the whole server. SIGTERM/SIGINT are forwarded to every
  worker, which drains as a single gateway does; a second signal is forwarded too
  (workers then abandon their drain). Workers die with the supervisor (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from serving.settings import Settings

log = logging.getLogger("imgserve.workers")

READY_FD_ENV = "IMGSERVE_READY_FD"          # a worker writes one line here once it serves
WORKER_INDEX_ENV = "IMGSERVE_WORKER_INDEX"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
RESTART_WINDOW_S = 10.0                      # a worker dying sooner than this after start counts as a crash loop
MAX_QUICK_DEATHS = 3


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes]
    started: float
    quick_deaths: int = 0
    ready: bool = False
    buffer: bytes = field(default=b"")
    read_fd: int = -1
    reaped: bool = False


def worker_argv(argv: Sequence[str], settings: Settings, grpc_port: int, http_port: int, workers: int) -> list[str]:
    """The worker's ``imgserve serve`` flags: the user's own, then what the supervisor decided (last wins)."""
    cores = settings.cores
    share = str(max(1, cores // workers))
    extra = ["--workers", "1", "--reuse-port", "true", "--grpc-port", str(grpc_port), "--http-port", str(http_port)]
    if not settings.preprocess_threads:
        extra += ["--preprocess-threads", share]
    if not settings.backend_threads:
        extra += ["--backend-threads", share]
    return [sys.executable, "-m", "clients.cli", "serve", *argv, *extra]


def pick_port(host: str, port: int) -> int:
    if port:
        return port
    from serving.triton_local import free_port

    return free_port("127.0.0.1" if host in ("0.0.0.0", "", "::") else host)


class Supervisor:
    """Starts, watches and stops the worker processes of one ``imgserve serve --workers N``."""

    def __init__(self, settings: Settings, argv: Sequence[str],
                 on_ready: Callable[[int, int], None] | None = None) -> None:
        self.settings = settings
        self.argv = list(argv)
        self.on_ready = on_ready
        self.workers: dict[int, Worker] = {}
        self.stopping = 0                    # signals received
        self.grpc_port = pick_port(settings.host, settings.grpc_port)
        self.http_port = pick_port(settings.host, settings.http_port)
        self._own_dir = MULTIPROC_ENV not in os.environ
        self.metrics_dir = os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="imgserve-metrics-")
        for name in os.listdir(self.metrics_dir):   # stale samples of an earlier run would be merged in
            if name.endswith(".db"):
                os.unlink(os.path.join(self.metrics_dir, name))

    def _spawn(self, index: int, quick_deaths: int = 0) -> Worker:
        from serving.triton_local import _pdeathsig_preexec

        read_fd, write_fd = os.pipe()
        env = {**os.environ, MULTIPROC_ENV: self.metrics_dir, READY_FD_ENV: str(write_fd),
               WORKER_INDEX_ENV: str(index)}
        proc = subprocess.Popen(worker_argv(self.argv, self.settings, self.grpc_port, self.http_port,
                                            self.settings.workers),
                                env=env, pass_fds=(write_fd,), preexec_fn=_pdeathsig_preexec())
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        return Worker(index=index, proc=proc, started=time.monotonic(), quick_deaths=quick_deaths, read_fd=read_fd)

    def run(self) -> int:
        """Supervise until a signal stops every worker; the exit status of the whole server."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for i in range(self.settings.workers):
                self.workers[i] = self._spawn(i)
            announced = False
            while True:
                self._read_ready()
                if not announced and all(w.ready for w in self.workers.values()):
                    announced = True
                    if self.on_ready is not None:
                        self.on_ready(self.grpc_port, self.http_port)
                status = self._reap()
                if status is not None:
                    return status
                time.sleep(0.05)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._kill_all()
            if self._own_dir:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping += 1
        log.info("%s: forwarding to %d workers", signal.Signals(signum).name, len(self.workers))
        for w in self.workers.values():
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)

    def _read_ready(self) -> None:
        fds = [w.read_fd for w in self.workers.values() if not w.ready and w.read_fd >= 0]
        if not fds:
            return
        readable, _, _ = select.select(fds, [], [], 0)
        for w in self.workers.values():
            if w.read_fd in readable:
                try:
                    chunk = os.read(w.read_fd, 256)
                except BlockingIOError:
                    continue
                w.buffer += chunk
                if b"\n" in w.buffer:
                    w.ready = True
                    os.close(w.read_fd)
                    w.read_fd = -1

    def _reap(self) -> int | None:
        """Restart crashed workers; once stopping, the final status when every worker has exited."""
        for index, w in list(self.workers.items()):
            code = w.proc.poll()
            if code is None or w.reaped:
                continue
            w.reaped = True
            if w.read_fd >= 0:
                os.close(w.read_fd)
                w.read_fd = -1
            self._mark_dead(w.proc.pid)
            if self.stopping:
                continue
            quick = w.quick_deaths + 1 if time.monotonic() - w.started < RESTART_WINDOW_S else 0
            if quick >= MAX_QUICK_DEATHS or (not w.ready and code in (1, 2)):
                log.error("worker %d exited with status %s %s; stopping the server", index, code,
                          "at start" if not w.ready else f"{quick} times in a row")
                self.stopping += 1
                self._on_signal(signal.SIGTERM, None)
                self._wait_all()
                return 1
            log.warning("worker %d (pid %d) exited with status %s; restarting it", index, w.proc.pid, code)
            self.workers[index] = self._spawn(index, quick)
            self.workers[index].ready = w.ready   # the server as a whole was ready: no second banner
        if self.stopping and all(w.proc.poll() is not None for w in self.workers.values()):
            codes = [w.proc.returncode for w in self.workers.values()]
            return 0 if all(c in (0, -signal.SIGTERM) for c in codes) else 1
        return None

    def _mark_dead(self, pid: int) -> None:
        try:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.metrics_dir)
        except Exception:  # metrics housekeeping must never take the supervisor down
            log.exception("could not mark worker %d dead in %s", pid, self.metrics_dir)

    def _wait_all(self, timeout_s: float | None = None) -> None:
        end = time.monotonic() + (timeout_s if timeout_s is not None else self.settings.shutdown_grace_s + 10)
        for w in self.workers.values():
            try:
                w.proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass

    def _kill_all(self) -> None:
        alive = [w for w in self.workers.values() if w.proc.poll() is None]
        for w in alive:
            w.proc.send_signal(signal.SIGTERM)
        self._wait_all()
        for w in alive:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
