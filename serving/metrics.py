"""Prometheus metrics of the gateway, defined once with fixed names.

Every ``Metrics`` owns its own ``CollectorRegistry`` so several gateways (or
tests) in one process never collide on the global default registry.

Transports wrap each call in ``with metrics.request(endpoint, model) as req``;
the batcher and the data plane record queue wait, batch size, backend and
preprocess time through the ``observe_*``/``set_*`` methods below.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from serving.errors import ServingError

# Latency buckets: from 1 ms to 30 s (request timeouts default to 30 s).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
# Queue waits are usually well below the request latency: start at 100 us.
QUEUE_WAIT_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
# Crops per backend call: powers of two up to 256.
BATCH_SIZE_BUCKETS: tuple[float, ...] = tuple(float(2 ** i) for i in range(9))

OK = "OK"
INTERNAL = "INTERNAL"


@dataclass
class RequestRecord:
    """What a transport knows about one call; it may set ``code`` (and ``model`` once parsed)."""

    endpoint: str
    model: str
    code: str | None = None


class Metrics:
    """All gateway metrics in one private registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_duration = Histogram(
            "imgserve_request_duration_seconds",
            "Time from receiving a request to sending its response, by model, endpoint and status code.",
            ["model", "endpoint", "code"], buckets=LATENCY_BUCKETS, registry=r)
        # multiprocess_mode: how `imgserve serve --workers N` sums the workers' values (ignored otherwise)
        self.requests_in_flight = Gauge(
            "imgserve_requests_in_flight",
            "Requests currently being handled, by endpoint.",
            ["endpoint"], registry=r, multiprocess_mode="livesum")
        self.request_errors = Counter(
            "imgserve_request_errors_total",
            "Requests that finished with a status code other than OK.",
            ["model", "endpoint", "code"], registry=r)
        self.queue_wait = Histogram(
            "imgserve_queue_wait_seconds",
            "Time a crop waited in the batcher queue before its backend call started.",
            ["model"], buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.preprocess_duration = Histogram(
            "imgserve_preprocess_duration_seconds",
            "Time to decode and crop the images of one request.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.backend_duration = Histogram(
            "imgserve_backend_duration_seconds",
            "Duration of one backend inference call (one batch).",
            ["model", "backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "imgserve_batch_size",
            "Crops per backend inference call.",
            ["model"], buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.backend_up = Gauge(
            "imgserve_backend_up",
            "1 when the backend reports ready, else 0.",
            ["backend"], registry=r, multiprocess_mode="livemin")
        self.queue_depth = Gauge(
            "imgserve_queue_depth",
            "Crops waiting in the batcher queue of a model.",
            ["model"], registry=r, multiprocess_mode="livesum")
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: the hot path records ~8 samples per request and
        prometheus-client validates and locks on every ``labels()`` call."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    # ------------------------------------------------------------ transports

    @contextmanager
    def request(self, endpoint: str, model: str) -> Iterator[RequestRecord]:
        """Measure one request: in-flight gauge while inside, latency and errors on exit.

        The code defaults to "OK". An exception escaping the block without a code
        set is recorded as its ServingError code, or "INTERNAL" for anything else.
        """
        record = RequestRecord(endpoint=endpoint, model=model)
        gauge = self._child(self.requests_in_flight, endpoint)
        gauge.inc()
        start = time.perf_counter()
        try:
            yield record
        except BaseException as exc:
            if record.code is None:
                record.code = exc.code_name if isinstance(exc, ServingError) else INTERNAL
            raise
        finally:
            gauge.dec()
            code = record.code or OK
            labels = (record.model or "", record.endpoint, code)   # model, endpoint, code
            self._child(self.request_duration, *labels).observe(time.perf_counter() - start)
            if code != OK:
                self._child(self.request_errors, *labels).inc()

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The registry in Prometheus text format (OpenMetrics if ``accept`` asks for it)."""
        encoder, content_type = choose_encoder(accept or "")
        registry = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # `serve --workers N`: every worker's samples, merged from the shared directory
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
        if content_type.startswith("application/openmetrics-text"):
            return encoder(registry), content_type
        return encoder(_WithoutCreated(registry)), content_type

    # ------------------------------------------------------------ data plane

    def observe_queue_wait(self, model: str, seconds: float) -> None:
        self._child(self.queue_wait, model).observe(seconds)

    def observe_preprocess(self, model: str, seconds: float) -> None:
        self._child(self.preprocess_duration, model).observe(seconds)

    def observe_backend(self, model: str, backend: str, seconds: float) -> None:
        self._child(self.backend_duration, model, backend).observe(seconds)

    def observe_batch_size(self, model: str, size: int) -> None:
        self._child(self.batch_size, model).observe(size)

    def set_queue_depth(self, model: str, depth: int) -> None:
        self._child(self.queue_depth, model).set(depth)

    def forget_model(self, model: str) -> None:
        """Drop the per-model gauge series of a model that is no longer served (its queue depth).

        Only the gauge: a depth for an unloaded model would read as a live queue. Counters and
        histograms are cumulative and stay, so rates over them see no reset.
        """
        try:
            self.queue_depth.remove(model)
        except KeyError:
            pass   # never recorded

    def set_backend_up(self, backend: str, up: bool) -> None:
        self.backend_up.labels(backend=backend).set(1 if up else 0)

    # ------------------------------------------------------------ reading (tests, bench)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """Current value of one sample (e.g. "imgserve_batch_size_count"), None if absent."""
        return self.registry.get_sample_value(name, labels or {})


class _WithoutCreated:
    """A view of a registry without ``*_created`` samples.

    The classic text format turns them into extra gauge families
    (``imgserve_request_errors_created``) that only double the exposition size;
    OpenMetrics has a proper place for them, so only the text format drops them.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            kept.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield kept
