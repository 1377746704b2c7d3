"""The Triton backend: runs preprocessed uint8 batches on one or more Triton servers over gRPC.

Why this shape:
* Tensors cross the wire as uint8 NHWC crops (normalisation lives inside the
  ONNX graph), 4x smaller than float32.
* gRPC message limits are raised on the channel to ``settings.max_message_bytes``
  in both directions, the same limit the gateway's own servers use.
* Model specs come from Triton itself (repository index + model metadata +
  model config, whose ``imgserve.*`` parameters carry the preprocessing facts),
  through ``serving.repository.spec_from_config`` - the same code path as the
  embedded backend. Triton does not serve label files, so labels are read from
  ``<settings.model_repository>/<model>/<label_filename>`` when that local copy
  exists; otherwise classes are named by their index ("0", "1", ...).
* Several URLs (``settings.triton_urls``) are used round-robin. A background
  task checks every server each ``settings.triton_health_interval_s``; a call that
  fails with UNAVAILABLE marks its server unhealthy and is retried once on the
  next healthy server.
* Each server has a circuit breaker (serving/breaker.py). A probe that fails or takes
  longer than ``settings.triton_probe_timeout_s`` (a dead or SIGSTOPped Triton) opens it:
  calls in flight there are aborted with UNAVAILABLE and no new call is sent until a
  probe succeeds again, so a hung Triton costs milliseconds, not deadlines.
* The call's ``client_timeout`` is what is left of the latest deadline in the batch
  (serving.batcher.BATCH_DEADLINE), so the client's deadline reaches Triton.
* A model Triton briefly does not list (it is reloading it: a new version, a config
  change) stays known for ``MISSING_GRACE_S``; calls for it wait up to ``RELOAD_WAIT_S``
  for it to be READY again and otherwise get UNAVAILABLE - never NOT_FOUND, and other
  models are not touched. Batches larger than a model's ``max_batch_size`` are split
  into chunks that are sent concurrently (and so spread across servers).
* With ``settings.triton_resolve_interval_s`` > 0 each URL's host is a DNS name that may
  stand for many servers (a Kubernetes headless Service): it is resolved at start and again
  every interval (``triton_discovery``), one client per address; servers that leave DNS are
  dropped, and their clients closed once calls in flight on them had time to finish.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from serving.backends.base import Backend, check_outputs
from serving.batcher import BATCH_DEADLINE
from serving.breaker import CircuitBreaker
from serving.backends.triton_discovery import Resolver, discover, resolve_addresses
from serving.errors import (
    BackendError,
    BackendUnavailable,
    DeadlineExceeded,
    InvalidInput,
    ModelNotFound,
    Overloaded,
    ServingError,
)
from serving.repository import PARAM_PREFIX, ModelSpec, RepositoryError, label_file_of, read_labels, spec_from_config
from serving.settings import Settings
from serving.tasks import check_servable

log = logging.getLogger(__name__)

# gRPC reconnect backoff is capped so a Triton that comes back is seen within about a health interval.
_MAX_RECONNECT_BACKOFF_MS = 500
# A model missing from Triton's index (reloading) stays served this long, and a call for it waits
# up to RELOAD_WAIT_S for it to come back before answering UNAVAILABLE.
MISSING_GRACE_S = 30.0
RELOAD_WAIT_S = 2.0


class ModelReloading(BackendUnavailable):
    """A known model is not READY on any server right now (Triton is loading it): retryable, and not the
    server's fault, so it does not open the server's breaker."""


def channel_args(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel options for Triton connections: raised message limits, keepalive, short reconnect backoff."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 2),
        ("grpc.initial_reconnect_backoff_ms", 250),
        ("grpc.min_reconnect_backoff_ms", 250),
        ("grpc.max_reconnect_backoff_ms", _MAX_RECONNECT_BACKOFF_MS),
    ]


def _status_name(exc: InferenceServerException) -> str:
    """'UNAVAILABLE' from tritonclient's 'StatusCode.UNAVAILABLE' (or '' when it has none)."""
    status = exc.status() or ""
    return status.rsplit(".", 1)[-1]


def map_error(exc: InferenceServerException, *, model: str, url: str) -> ServingError:
    """Translate a tritonclient error into the data plane's typed errors."""
    status = _status_name(exc)
    message = exc.message() or str(exc)
    lowered = message.lower()
    if status == "UNAVAILABLE":
        return BackendUnavailable(f"Triton at {url} is unavailable: {message}")
    if "unknown model" in lowered or status == "NOT_FOUND":
        return ModelNotFound(f"model {model!r} is not served by Triton at {url}")
    if status == "DEADLINE_EXCEEDED":
        return DeadlineExceeded(f"Triton at {url} did not answer in time for model {model!r}")
    if status == "RESOURCE_EXHAUSTED":
        if "larger than max" in lowered or ("message" in lowered and "size" in lowered):
            return BackendError(f"message to/from Triton exceeds max_message_mb: {message}")
        return Overloaded(f"Triton at {url} is overloaded: {message}")
    if status == "INVALID_ARGUMENT":
        return InvalidInput(f"Triton rejected the input for model {model!r}: {message}")
    if status == "CANCELLED":
        return BackendUnavailable(f"call to Triton at {url} was cancelled: {message}")
    return BackendError(f"Triton at {url} failed for model {model!r}: {message}")


@dataclass(frozen=True)
class ServerStatus:
    """What the backend currently believes about one Triton endpoint (for logs, tests and debugging)."""

    url: str
    healthy: bool
    models: dict[str, int]
    last_error: str


@dataclass
class _Server:
    """One Triton endpoint, its client and what the last health check saw."""

    url: str
    client: triton_aio.InferenceServerClient
    healthy: bool = False
    models: dict[str, int] = field(default_factory=dict)   # READY model name -> served version
    last_error: str = ""
    breaker: CircuitBreaker = field(init=False)

    def __post_init__(self) -> None:
        self.breaker = CircuitBreaker(f"Triton {self.url}")

    def mark_down(self, reason: str) -> None:
        """Not healthy, and its breaker open: calls in flight there end now with UNAVAILABLE."""
        self.healthy = False
        self.last_error = reason
        self.breaker.trip(reason)


class TritonBackend(Backend):
    """Backend over ``tritonclient.grpc.aio`` with round-robin, health checks and one retry."""

    name = "triton"
    # Two calls in flight per instance: a call's time is the network round trip plus Triton's
    # queue plus compute, and with one in flight Triton's instance idles during the round trip.
    # With two, the next batch already waits in Triton's dynamic batcher while one computes.
    calls_per_instance = 2

    def __init__(self, settings: Settings, resolver: Resolver = resolve_addresses) -> None:
        urls = settings.triton_urls
        if not urls:
            raise ValueError("the triton backend needs settings.triton_url (host:port[,host:port...])")
        self.settings = settings
        self._urls = urls
        self._servers: list[_Server] = []
        self._specs: dict[str, ModelSpec] = {}
        self._rr = 0
        self._health_task: asyncio.Task[None] | None = None
        self._refresh_lock = asyncio.Lock()
        self._call_timeout_s = max(1.0, settings.request_timeout_s)
        self._probe_timeout_s = settings.triton_probe_timeout_s
        self._last_ready: dict[str, float] = {}    # model -> when a healthy server last listed it READY
        self._resolver = resolver
        self._resolve_interval_s = settings.triton_resolve_interval_s
        self._next_resolve = 0.0
        self._retiring: set[asyncio.Task[None]] = set()
        self._retired: list[_Server] = []
        self._unresolved: dict[str, str] = {}              # configured URL -> why it did not resolve
        self._endpoints_of: dict[str, list[str]] = {}   # configured URL -> endpoints it last resolved to

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._resolve_interval_s > 0:
            await self.rediscover()
        else:
            self._servers = [self._new_server(url) for url in self._urls]
        await self.check_health()
        if not any(s.healthy for s in self._servers):
            details = "; ".join([f"{s.url}: {s.last_error or 'not ready'}" for s in self._servers]
                                + [f"{url}: cannot resolve ({why})" for url, why in self._unresolved.items()])
            await self.close()
            raise BackendUnavailable(f"no Triton server is ready ({details})")
        self._health_task = asyncio.create_task(self._health_loop(), name="triton-health")

    async def close(self) -> None:
        task, self._health_task = self._health_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for retiring in list(self._retiring):  # their clients are closed right below instead
            retiring.cancel()
        servers, self._servers = self._servers + [s for s in self._retired], []
        self._retired = []
        for server in servers:
            with contextlib.suppress(Exception):
                await server.client.close()

    def _new_server(self, url: str) -> _Server:
        args = channel_args(self.settings.max_message_bytes)
        return _Server(url, triton_aio.InferenceServerClient(url, channel_args=args))

    # ------------------------------------------------------------ DNS discovery

    async def rediscover(self) -> None:
        """Resolve the configured URLs again and make the server list match the addresses found.

        New addresses get a client (healthy after their first probe); addresses that left DNS are
        dropped at once for new calls. A URL that does not resolve keeps the servers it had, as a
        DNS outage or a moment with no ready pod must not empty a working list.
        """
        found = await discover(self._urls, self._resolver)
        self._unresolved = dict(found.failures)
        for url, why in found.failures.items():
            log.warning("cannot resolve Triton URL %s (%s); keeping the servers it had", url, why)
        by_url = dict(found.resolved)
        for url in found.failures:
            by_url[url] = self._endpoints_of.get(url, [])
        self._endpoints_of = by_url
        wanted = list(dict.fromkeys(e for url in self._urls for e in by_url.get(url, [])))
        current = {s.url: s for s in self._servers}
        added = [u for u in wanted if u not in current]
        removed = [s for u, s in current.items() if u not in wanted]
        if added or removed:
            log.info("Triton servers: added %s, removed %s", added, [s.url for s in removed])
        self._servers = [current.get(u) or self._new_server(u) for u in wanted]
        for server in removed:
            self._retire(server)
        self._next_resolve = asyncio.get_running_loop().time() + self._resolve_interval_s

    def _retire(self, server: _Server) -> None:
        """Close a dropped server's client after calls already sent to it had time to finish."""
        self._retired.append(server)

        async def close_later() -> None:
            try:
                await asyncio.sleep(self._call_timeout_s)
            finally:
                if server in self._retired:
                    self._retired.remove(server)
                    with contextlib.suppress(Exception):
                        await server.client.close()

        task = asyncio.create_task(close_later(), name=f"triton-retire-{server.url}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # ------------------------------------------------------------ health and model specs

    async def _health_loop(self) -> None:
        interval = max(0.05, self.settings.triton_health_interval_s)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            try:
                if self._resolve_interval_s > 0 and loop.time() >= self._next_resolve:
                    await self.rediscover()
                await self.check_health()
            except Exception:  # never let the loop die; the next round tries again
                log.exception("Triton health check failed unexpectedly")

    async def check_health(self) -> None:
        """Probe every server concurrently, then load specs for models not seen before."""
        await asyncio.gather(*(self._probe(s) for s in self._servers))
        await self._refresh_specs()

    async def _probe(self, server: _Server) -> None:
        was = server.healthy
        try:
            ready = await server.client.is_server_ready(client_timeout=self._probe_timeout_s)
            models: dict[str, int] = {}
            if ready:
                index = await server.client.get_model_repository_index(client_timeout=self._probe_timeout_s)
                for entry in index.models:
                    if entry.state == "READY" and entry.version.isdigit():
                        models[entry.name] = max(models.get(entry.name, 0), int(entry.version))
            server.models = models
            if ready:
                now = time.monotonic()
                self._last_ready.update((name, now) for name in models)
                server.healthy = True
                server.last_error = ""
                server.breaker.reset()
            else:
                server.mark_down("server not ready")
        except InferenceServerException as exc:
            server.mark_down(exc.message() or str(exc))
        except Exception as exc:  # a probe must never take the other servers' probes down with it
            server.mark_down(f"{type(exc).__name__}: {exc}")
        if was != server.healthy:
            level = logging.INFO if server.healthy else logging.WARNING
            log.log(level, "Triton %s is now %s%s", server.url, "healthy" if server.healthy else "UNHEALTHY",
                    f" ({server.last_error})" if server.last_error else "")

    async def _refresh_specs(self) -> None:
        """Fetch metadata + config for (model, version) pairs whose spec is missing or stale."""
        async with self._refresh_lock:
            for server in self._servers:
                if not server.healthy:
                    continue
                for name, version in server.models.items():
                    known = self._specs.get(name)
                    if known is not None and known.version >= version:
                        continue
                    try:
                        self._specs[name] = await self._fetch_spec(server, name)
                    except (RepositoryError, InferenceServerException, ValueError) as exc:
                        log.warning("Triton %s: model %r is not servable by imgserve: %s", server.url, name, exc)

    async def _fetch_spec(self, server: _Server, name: str) -> ModelSpec:
        client = server.client
        meta = await client.get_model_metadata(name, client_timeout=self._probe_timeout_s)
        cfg_response = await client.get_model_config(name, as_json=False, client_timeout=self._probe_timeout_s)
        cfg: mc.ModelConfig = cfg_response.config
        if not cfg.name:
            cfg.name = name
        # Triton reports its normalised config: an unset preferred_batch_size comes back as
        # [max_batch_size], which means the same thing; undo it so specs equal those read from disk.
        preferred = cfg.dynamic_batching.preferred_batch_size
        if list(preferred) == [cfg.max_batch_size]:
            del preferred[:]
        versions = [int(v) for v in meta.versions if v.isdigit()]
        version = max(versions) if versions else server.models.get(name, 1)
        if len(meta.inputs) != 1 or meta.inputs[0].datatype != "UINT8":
            raise RepositoryError(f"expected one UINT8 input, Triton reports "
                                  f"{[(i.name, i.datatype) for i in meta.inputs]}")
        spec = spec_from_config(cfg, self._local_labels(cfg), version)
        check_servable(spec)
        return spec

    def _local_labels(self, cfg: mc.ModelConfig) -> list[str]:
        """Labels from the local repository copy, when the gateway has one (Triton does not serve them)."""
        repo = Path(self.settings.model_repository)
        label_file = label_file_of(cfg)
        labels = read_labels(repo / cfg.name / label_file)
        task = cfg.parameters[PARAM_PREFIX + "task"].string_value if PARAM_PREFIX + "task" in cfg.parameters else ""
        num_classes = (int(cfg.output[0].dims[-1]) if task in ("", "classification") and len(cfg.output) == 1
                       and cfg.output[0].dims else 0)
        if labels and num_classes and len(labels) != num_classes:
            log.warning("labels in %s do not match Triton's %d classes of %r; using class indices",
                        repo / cfg.name / label_file, num_classes, cfg.name)
            return []
        return labels

    # ------------------------------------------------------------ Backend API

    async def models(self) -> dict[str, ModelSpec]:
        served = {name for s in self._servers for name in s.models}
        recent = time.monotonic() - MISSING_GRACE_S
        # a model Triton is reloading stays known (its calls wait or get UNAVAILABLE, not NOT_FOUND)
        return {name: spec for name, spec in self._specs.items()
                if name in served or self._last_ready.get(name, -1e18) >= recent}

    async def ready(self) -> bool:
        return any(s.healthy and any(n in self._specs for n in s.models) for s in self._servers)

    async def model_ready(self, model: str) -> bool:
        return model in self._specs and any(s.healthy and model in s.models for s in self._servers)

    def servers(self) -> list[ServerStatus]:
        return [ServerStatus(s.url, s.healthy, dict(s.models), s.last_error) for s in self._servers]

    async def infer(self, model: str, batch: np.ndarray) -> dict[str, np.ndarray]:
        spec = self._specs.get(model)
        if spec is None or model not in await self.models():
            raise ModelNotFound(f"model {model!r} is not served by Triton")
        self._check_batch(spec, batch)
        batch = np.ascontiguousarray(batch)
        step = max(1, spec.max_batch_size)
        if len(batch) <= step:
            return await self._infer_with_retry(spec, batch)
        parts = await asyncio.gather(*(self._infer_with_retry(spec, batch[i:i + step])
                                       for i in range(0, len(batch), step)))
        return {name: np.concatenate([part[name] for part in parts], axis=0) for name in spec.output_names}

    @staticmethod
    def _check_batch(spec: ModelSpec, batch: np.ndarray) -> None:
        if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8:
            raise InvalidInput(f"model {spec.name!r} takes uint8 crops, got "
                               f"{getattr(batch, 'dtype', type(batch).__name__)}")
        if batch.ndim != 4 or tuple(batch.shape[1:]) != spec.input_shape or len(batch) == 0:
            raise InvalidInput(f"model {spec.name!r} takes [N>0, {', '.join(map(str, spec.input_shape))}] "
                               f"uint8 batches, got shape {list(batch.shape)}")

    def _pick(self, model: str, exclude: set[str]) -> _Server | None:
        """The next healthy server (round-robin) that serves the model, skipping ``exclude``."""
        count = len(self._servers)
        for _ in range(count):
            server = self._servers[self._rr % count]
            self._rr = (self._rr + 1) % count
            if server.healthy and model in server.models and server.url not in exclude:
                return server
        return None

    def _reload_budget_end(self) -> float:
        """How long a call may wait for a reloading model: RELOAD_WAIT_S, cut by the batch's deadline."""
        end = time.monotonic() + RELOAD_WAIT_S
        deadline = BATCH_DEADLINE.get()
        return end if deadline is None else min(end, deadline)

    async def _infer_with_retry(self, spec: ModelSpec, batch: np.ndarray) -> dict[str, np.ndarray]:
        tried: set[str] = set()
        last: ServingError | None = None
        reload_end: float | None = None
        attempts = 0
        while attempts < 2:
            server = self._pick(spec.name, tried)
            if server is None:
                if (any(s.healthy for s in self._servers) and not any(spec.name in s.models for s in self._servers)
                        and spec.name in self._specs):
                    # no healthy server lists the model READY right now: Triton is (re)loading it
                    reload_end = reload_end or self._reload_budget_end()
                    if time.monotonic() < reload_end:
                        await asyncio.sleep(0.05)
                        continue
                    raise ModelReloading(f"model {spec.name!r} is being loaded by Triton; retry shortly")
                break
            tried.add(server.url)
            attempts += 1
            try:
                return await self._infer_once(server, spec, batch)
            except ModelReloading as exc:
                # that server is reloading the model: other models and servers are fine; try again
                reload_end = reload_end or self._reload_budget_end()
                last = exc
                if time.monotonic() < reload_end:
                    tried.discard(server.url)
                    attempts -= 1
                    await asyncio.sleep(0.05)
            except BackendUnavailable as exc:
                server.mark_down(exc.message)
                log.warning("Triton %s failed a call (%s); marked unhealthy", server.url, exc.message)
                last = exc
        if last is not None:
            raise last
        raise BackendUnavailable(f"no healthy Triton server serves model {spec.name!r} "
                                 f"({', '.join(s.url + ': ' + (s.last_error or 'not ready') for s in self._servers)})")

    async def _infer_once(self, server: _Server, spec: ModelSpec, batch: np.ndarray) -> dict[str, np.ndarray]:
        tensor = InferInput(spec.input_name, list(batch.shape), "UINT8")
        tensor.set_data_from_numpy(batch)
        timeout = self._call_timeout_s
        deadline = BATCH_DEADLINE.get()
        if deadline is not None:   # the client's deadline travels to Triton
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise DeadlineExceeded(f"deadline passed before the call to Triton for model {spec.name!r}")
        try:
            result = await server.breaker.guard(server.client.infer(
                spec.name, [tensor], outputs=[InferRequestedOutput(name) for name in spec.output_names],
                client_timeout=timeout))
        except InferenceServerException as exc:
            error = map_error(exc, model=spec.name, url=server.url)
            if isinstance(error, ModelNotFound) and spec.name in self._specs:
                raise ModelReloading(f"model {spec.name!r} is not loaded on Triton at {server.url} "
                                     f"(reloading?); retry shortly") from None
            raise error from None
        except grpc.RpcError as exc:  # not wrapped by tritonclient (e.g. channel closed)
            raise BackendUnavailable(f"Triton at {server.url}: {exc}") from None
        found = {name: value for name in spec.output_names if (value := result.as_numpy(name)) is not None}
        return check_outputs(spec, found, len(batch))


def create_backend(settings: Settings) -> TritonBackend:
    """Factory used by the gateway (imported lazily, so the embedded backend never needs tritonclient)."""
    return TritonBackend(settings)
