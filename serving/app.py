"""The gateway process: Settings -> backend -> Metrics -> DataPlane -> gRPC + HTTP servers.

One asyncio loop runs both servers. gRPC carries imgserve.v1.ImageService, the
Open Inference Protocol service, grpc.health.v1 (overall and per service) and
server reflection. A background task keeps health, ``/readyz`` and the
``imgserve_backend_up`` gauge in step with the backend. SIGTERM/SIGINT drain:
health turns NOT_SERVING, listeners close, in-flight requests get
``settings.shutdown_grace_s`` to finish, then the data plane and backend close.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.backends.base import Backend
from serving.dataplane import DataPlane
from serving.health import DrainingHealthServicer
from serving.metrics import Metrics
from serving.settings import Settings
from serving.transports import grpc_v1, grpc_v2
from serving.transports.http import create_app

log = logging.getLogger("imgserve.app")

# settings.backend -> module holding the Backend implementation (imported only when chosen)
BACKEND_MODULES: dict[str, str] = {
    "onnxruntime": "serving.backends.onnxruntime",
    "triton": "serving.backends.triton",
}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class StartupError(RuntimeError):
    """The gateway cannot start (port in use, backend unusable); the message is for the operator."""


def create_backend(settings: Settings) -> Backend:
    """Instantiate the configured backend from its module.

    The module either offers ``create_backend(settings)`` or defines exactly one
    Backend subclass taking ``settings``; the import happens only here so the
    Triton client is never loaded for the embedded backend and vice versa.
    """
    module = importlib.import_module(BACKEND_MODULES[settings.backend])
    factory = getattr(module, "create_backend", None)
    if callable(factory):
        return factory(settings)
    classes = [obj for obj in vars(module).values()
               if inspect.isclass(obj) and issubclass(obj, Backend) and obj is not Backend
               and obj.__module__ == module.__name__ and not inspect.isabstract(obj)]
    if len(classes) != 1:
        raise StartupError(f"{module.__name__} must define one Backend subclass, found {len(classes)}")
    return classes[0](settings)


@dataclass
class Gateway:
    """Owns every long-lived object of one gateway process."""

    settings: Settings
    backend: Backend
    metrics: Metrics = field(default_factory=Metrics)
    dataplane: DataPlane = field(init=False)
    health: health.aio.HealthServicer = field(init=False)
    grpc_server: grpc.aio.Server | None = None
    http_runner: web.AppRunner | None = None
    grpc_port: int = 0
    http_port: int = 0
    draining: bool = False
    _monitor: asyncio.Task[None] | None = None
    _started: bool = False

    def __post_init__(self) -> None:
        self.dataplane = DataPlane(self.settings, self.backend, self.metrics)
        self.health = DrainingHealthServicer()

    @property
    def service_names(self) -> tuple[str, ...]:
        return (grpc_v1.SERVICE_NAME, grpc_v2.SERVICE_NAME)

    async def ready(self) -> bool:
        """Ready to take traffic: the backend serves and we are not draining."""
        return not self.draining and await self._backend_ready()

    async def _backend_ready(self) -> bool:
        try:
            return await self.dataplane.ready()
        except Exception:  # a flaky readiness probe must not kill the monitor
            log.exception("readiness check failed")
            return False

    # ------------------------------------------------------------ start

    async def start(self) -> None:
        """Start data plane (and with it the backend) and both servers; on failure, undo what started."""
        try:
            self._started = True
            await self.dataplane.start()  # starts the backend too
            await self._start_grpc()
            await self._start_http()
            await self._sync_health()
            self._monitor = asyncio.create_task(self._watch_backend(), name="imgserve-health")
        except BaseException:
            await self.close(grace_s=0.0)
            raise

    async def _start_grpc(self) -> None:
        limit = self.settings.max_message_bytes
        server = grpc.aio.server(options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            # never share a port with another process (a second gateway on the same port would
            # silently get half the connections), except with the sibling workers of --workers N
            ("grpc.so_reuseport", 1 if self.settings.reuse_port else 0),
        ])
        grpc_v1.add_to_server(grpc_v1.ImageService(self.dataplane, self.metrics), server)
        grpc_v2.add_to_server(grpc_v2.InferenceService(self.dataplane, self.metrics, self.settings,
                                                       readiness=self.ready), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{self.settings.host}:{self.settings.grpc_port}"
        try:
            self.grpc_port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise StartupError(f"cannot listen for gRPC on {address}: {exc} (port in use?)") from exc
        if self.grpc_port == 0:
            raise StartupError(f"cannot listen for gRPC on {address} (port in use?)")
        self.grpc_server = server
        await server.start()

    async def _start_http(self) -> None:
        app = create_app(self.dataplane, self.metrics, self.settings, readiness=self.ready)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.settings.shutdown_grace_s)
        await runner.setup()
        self.http_runner = runner
        site = web.TCPSite(runner, self.settings.host, self.settings.http_port, reuse_address=True,
                           reuse_port=self.settings.reuse_port or None)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(f"cannot listen for HTTP on {self.settings.host}:{self.settings.http_port}: "
                               f"{exc.strerror or exc}") from exc
        self.http_port = int(runner.addresses[0][1])

    # ------------------------------------------------------------ health

    async def _sync_health(self) -> bool:
        backend_ready = await self._backend_ready()
        self.metrics.set_backend_up(self.backend.name, backend_ready)
        status = SERVING if backend_ready and not self.draining else NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)
        return backend_ready

    async def _watch_backend(self) -> None:
        interval = max(0.1, self.settings.triton_health_interval_s)
        last: bool | None = None
        while True:
            ready = await self._sync_health()
            if ready != last:
                log.log(logging.INFO if ready else logging.WARNING, "backend %s is %s", self.backend.name,
                        "ready" if ready else "NOT ready")
                last = ready
            await asyncio.sleep(interval)

    # ------------------------------------------------------------ stop

    async def stop(self) -> None:
        """Graceful stop: NOT_SERVING, stop accepting, let in-flight requests finish, close."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: health NOT_SERVING, waiting up to %.1f s for in-flight requests",
                 self.settings.shutdown_grace_s)
        await self.health.enter_graceful_shutdown()
        await self.close(self.settings.shutdown_grace_s)
        log.info("stopped")

    async def close(self, grace_s: float) -> None:
        """Stop servers (in-flight requests get ``grace_s``), then the data plane and backend.

        ``grace_s`` bounds the whole stop: the data plane gets only what the servers left of it,
        so a stuck backend cannot stretch a SIGTERM past the grace period the operator set.
        """
        end = time.monotonic() + grace_s
        self.draining = True
        self.dataplane.flush_queues()  # in-flight requests must not wait out the batching delay
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        closers = []
        if self.grpc_server is not None:
            closers.append(self.grpc_server.stop(grace_s))
        if self.http_runner is not None:
            closers.append(self.http_runner.cleanup())
        for result in await asyncio.gather(*closers, return_exceptions=True):
            if isinstance(result, BaseException):
                log.error("error while stopping a server: %r", result)
        self.grpc_server, self.http_runner = None, None
        if self._started:
            try:
                # drains queued work, then closes the backend
                await self.dataplane.stop(timeout_s=end - time.monotonic())
            except Exception:
                log.exception("error while stopping the data plane")
            self._started = False  # only now: a close cancelled midway (second signal) is redone by serve()


async def serve(settings: Settings,
                on_started: Callable[[Gateway], Awaitable[None]] | None = None) -> None:
    """Run a gateway until SIGTERM/SIGINT, then stop it gracefully (a second signal aborts the drain)."""
    gateway = Gateway(settings=settings, backend=create_backend(settings))
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    current = asyncio.current_task()

    abandoned = False

    def on_signal(signum: int) -> None:
        nonlocal abandoned
        if stop_requested.is_set():
            log.warning("second %s: abandoning the drain", signal.Signals(signum).name)
            abandoned = True
            if current is not None:
                current.cancel()
            return
        log.info("%s received, shutting down", signal.Signals(signum).name)
        stop_requested.set()

    # installed before start so a SIGTERM while models load still ends in a clean stop
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await gateway.start()
        if on_started is not None and not stop_requested.is_set():
            await on_started(gateway)
        await stop_requested.wait()
        await gateway.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if abandoned or not gateway.draining:  # the graceful path never ran, or was cut short
            await gateway.close(grace_s=0.0)   # in-flight requests fail now; the backend still closes
