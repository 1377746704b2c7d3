"""Request metrics for transports, with bounded label values.

The model label comes from the client; a name the gateway does not serve is
recorded as UNKNOWN_MODEL so arbitrary names cannot grow the metric series.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from serving.errors import ModelNotFound
from serving.metrics import Metrics, RequestRecord

UNKNOWN_MODEL = "(unknown)"


@contextmanager
def observe(metrics: Metrics, endpoint: str, model: str) -> Iterator[RequestRecord]:
    """``metrics.request`` that relabels requests for models that do not exist."""
    with metrics.request(endpoint, model) as record:
        try:
            yield record
        except ModelNotFound:
            record.model = UNKNOWN_MODEL
            raise
