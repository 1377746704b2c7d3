"""The gateway process: Settings -> backend -> Metrics -> DataPlane -> gRPC + HTTP servers.

One asyncio loop runs both servers. gRPC carries imgserve.v1.ImageService, the
Open Inference Protocol service, grpc.health.v1 (overall and per service) and
server reflection. A background task keeps health, ``/readyz`` and the
``imgserve_backend_up`` gauge in step with the backend: one readiness value, written in
one place (``_sync_health``) and read by gRPC health, ``/readyz`` and the v2 ready calls,
so they never disagree. SIGTERM/SIGINT drain without loss (``Gateway.stop``):

1. *draining*: health and readiness turn NOT_SERVING at once, requests are still served
   (HTTP responses say ``Connection: close``) for ``settings.drain_delay_s``, so load
   balancers stop sending;
2. *refusing*: new requests get UNAVAILABLE / 503 + Retry-After (never a reset), admitted
   ones finish within ``settings.shutdown_grace_s``;
3. the listeners close, then the data plane and backend.

SIGHUP asks the model control (serving/reload.py) to poll the repository when it can,
and is otherwise ignored with a log line; it never stops the gateway.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import logging
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving.backends.base import Backend
from serving.dataplane import DataPlane
from serving.drain import drain_middleware
from serving.health import DrainingHealthServicer
from serving.metrics import Metrics
from serving import security
from serving.reload import ModelControl, control_for
from serving.settings import Settings
from serving.transports import grpc_v1, grpc_v2
from serving.transports.auth import AuthInterceptor
from serving.transports.grpc_guard import MalformedRequestInterceptor
from serving.transports.http import create_app
from serving.transports.http_server import GuardedAppRunner

log = logging.getLogger("imgserve.app")

# settings.backend -> module holding the Backend implementation (imported only when chosen)
BACKEND_MODULES: dict[str, str] = {
    "onnxruntime": "serving.backends.onnxruntime",
    "triton": "serving.backends.triton",
}
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
MONITOR_INTERVAL_S = 0.1
QUIET_BEFORE_CLOSE_S = 0.25   # drain: no refusal for this long before the listeners close ...
MAX_QUIET_WAIT_S = 3.0        # ... or at most this long (and never past the grace period)


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
    draining: bool = False       # NOT_SERVING; still serving until refusing
    refusing: bool = False       # new requests get UNAVAILABLE / 503
    _ready_state: bool = False   # the one readiness value (see _sync_health)
    _monitor: asyncio.Task[None] | None = None
    _started: bool = False
    auth: security.AuthPolicy | None = None
    _grpc_credentials: grpc.ServerCredentials | None = None
    _http_ssl: ssl.SSLContext | None = None
    model_control: ModelControl | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.dataplane = DataPlane(self.settings, self.backend, self.metrics)
        self.health = DrainingHealthServicer()
        self.model_control = control_for(self.backend, self.settings.model_control_mode,
                                         self.settings.repository_poll_interval_s)
        self.dataplane.model_control = self.model_control
        if self.model_control is not None:
            self.model_control.on_change = self.dataplane.forget_unloaded

    @property
    def service_names(self) -> tuple[str, ...]:
        return (grpc_v1.SERVICE_NAME, grpc_v2.SERVICE_NAME)

    async def ready(self) -> bool:
        """Ready to take traffic: the backend serves and we are not draining.

        The value gRPC health reports too (both set by ``_sync_health``), so ``/readyz``
        and health never disagree, even for the monitor's 100 ms between two looks.
        """
        return self._ready_state and not self.draining

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
            self._load_security()
            self._started = True
            await self.dataplane.start()  # starts the backend too
            if self.model_control is not None:
                await self.model_control.start()
            await self._start_grpc()
            await self._start_http()
            await self._sync_health()
            self._monitor = asyncio.create_task(self._watch_backend(), name="imgserve-health")
        except BaseException:
            await self.close(grace_s=0.0)
            raise

    def _load_security(self) -> None:
        """Tokens and TLS files are checked before anything listens: a typo must stop the start, loudly."""
        try:
            self.auth = security.AuthPolicy.from_settings(self.settings)
            self._grpc_credentials = security.grpc_server_credentials(self.settings)
            self._http_ssl = security.http_ssl_context(self.settings)
        except security.SecurityConfigError as exc:
            raise StartupError(str(exc)) from None
        warning = security.exposure_warning(self.settings)
        if warning is not None:
            log.warning("%s", warning)

    async def _start_grpc(self) -> None:
        limit = self.settings.max_message_bytes
        interceptors = ([AuthInterceptor(self.auth)] if self.auth is not None else []) + [MalformedRequestInterceptor()]
        server = grpc.aio.server(interceptors=interceptors, options=[
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
            self.grpc_port = (server.add_secure_port(address, self._grpc_credentials)
                              if self._grpc_credentials is not None else server.add_insecure_port(address))
        except RuntimeError as exc:
            raise StartupError(f"cannot listen for gRPC on {address}: {exc} (port in use?)") from exc
        if self.grpc_port == 0:
            raise StartupError(f"cannot listen for gRPC on {address} (port in use?)")
        self.grpc_server = server
        await server.start()

    async def _start_http(self) -> None:
        app = create_app(self.dataplane, self.metrics, self.settings, readiness=self.ready, auth=self.auth)
        app.middlewares.insert(0, drain_middleware(self))   # outermost: refusals cost nothing else
        runner = GuardedAppRunner(app, access_log=None, shutdown_timeout=self.settings.shutdown_grace_s,
                                  keepalive_timeout=self.settings.http_keepalive_timeout_s,
                                  header_timeout_s=self.settings.http_header_timeout_s)
        await runner.setup()
        self.http_runner = runner
        site = web.TCPSite(runner, self.settings.host, self.settings.http_port, reuse_address=True,
                           reuse_port=self.settings.reuse_port or None, ssl_context=self._http_ssl)
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
        self._ready_state = status == SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)
        return backend_ready

    async def _watch_backend(self) -> None:
        # Reading the backend's state is cheap (flags kept by its own probes), so look often:
        # readiness then follows a backend fault or recovery within 100 ms.
        interval = MONITOR_INTERVAL_S
        last: bool | None = None
        while True:
            ready = await self._sync_health()
            if ready != last:
                log.log(logging.INFO if ready else logging.WARNING, "backend %s is %s", self.backend.name,
                        "ready" if ready else "NOT ready")
                last = ready
            await asyncio.sleep(interval)

    # ------------------------------------------------------------ signals

    def hangup(self) -> None:
        """SIGHUP: poll the model repository now where the model control can; otherwise say it is ignored."""
        control = getattr(self.dataplane, "model_control", None)
        if control is not None and control.poll_soon():
            log.info("SIGHUP: polling the model repository now")
        else:
            log.info("SIGHUP ignored: nothing to reload (backend %s, --model-control-mode %s); "
                     "send SIGTERM to stop", self.backend.name, self.settings.model_control_mode)

    # ------------------------------------------------------------ stop

    async def stop(self) -> None:
        """Drain without loss: NOT_SERVING (still serving) for drain_delay_s, then refuse new requests,
        let admitted ones finish within shutdown_grace_s, then close."""
        if self.draining:
            return
        self.draining = True
        self._ready_state = False
        await self.health.enter_graceful_shutdown()   # every service NOT_SERVING; Watch streams end
        delay, grace = self.settings.drain_delay_s, self.settings.shutdown_grace_s
        log.info("draining: health NOT_SERVING; serving for %.1f s more, then refusing new requests and "
                 "waiting up to %.1f s for in-flight ones", delay, grace)
        if delay > 0:
            await asyncio.sleep(delay)
        self.refusing = True
        self.dataplane.refuse_new()
        end = time.monotonic() + grace
        if not await self.dataplane.wait_idle(grace):
            log.warning("drain: %d requests still running after the %.1f s grace period",
                        self.dataplane.in_flight, grace)
        # Closing the servers while clients still send would cut the calls the gRPC core has taken
        # but not yet handed over (CANCELLED) and reset fresh HTTP connections: keep refusing until
        # a short quiet moment (clients told Retry-After back off), within the grace period.
        quiet_end = min(end, time.monotonic() + MAX_QUIET_WAIT_S)
        while (time.monotonic() < quiet_end
               and time.monotonic() - self.dataplane.last_refusal < QUIET_BEFORE_CLOSE_S):
            await asyncio.sleep(0.02)
        await self.close(max(0.0, end - time.monotonic()))
        log.info("stopped")

    async def close(self, grace_s: float) -> None:
        """Stop servers (in-flight requests get ``grace_s``), then the data plane and backend.

        ``grace_s`` bounds the whole stop: the data plane gets only what the servers left of it,
        so a stuck backend cannot stretch a SIGTERM past the grace period the operator set.
        """
        end = time.monotonic() + grace_s
        self.draining = self.refusing = True
        self._ready_state = False
        self.dataplane.flush_queues()  # in-flight requests must not wait out the batching delay
        if self.model_control is not None:
            await self.model_control.stop()
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

    def on_hangup() -> None:
        gateway.hangup()

    # installed before start so a SIGTERM while models load still ends in a clean stop
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        await gateway.start()
        if on_started is not None and not stop_requested.is_set():
            await on_started(gateway)
        await stop_requested.wait()
        await gateway.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if abandoned or not gateway.draining:  # the graceful path never ran, or was cut short
            await gateway.close(grace_s=0.0)   # in-flight requests fail now; the backend still closes
