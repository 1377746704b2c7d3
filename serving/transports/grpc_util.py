"""What both gRPC services share: deadlines from the call and the one error-to-status path."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TypeVar

import grpc

from serving.errors import ModelNotFound, ServingError, advertised_retry_after
from serving.metrics import RequestRecord
from serving.transports.observe import UNKNOWN_MODEL

log = logging.getLogger("imgserve.grpc")
T = TypeVar("T")

INTERNAL_MESSAGE = "internal error in the gateway (the server log has the details)"


def call_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The client's gRPC deadline as absolute time.monotonic() seconds (None when it set none)."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic() + max(0.0, remaining)


async def guarded(context: grpc.aio.ServicerContext, record: RequestRecord, work: Awaitable[T]) -> T:
    """Await ``work``; turn its failure into a gRPC status and record the code for metrics.

    ServingError -> its own status and client-safe message (an unknown model is
    recorded under the UNKNOWN_MODEL label) (RESOURCE_EXHAUSTED also
    carries a ``retry-after`` trailer in seconds); anything else -> INTERNAL with a
    generic message while the traceback goes to the log.
    """
    try:
        return await work
    except ServingError as exc:
        record.code = exc.code_name
        if isinstance(exc, ModelNotFound):
            record.model = UNKNOWN_MODEL
        if exc.retry_after_s is not None:
            context.set_trailing_metadata((("retry-after", str(advertised_retry_after(exc.retry_after_s))),))
        await context.abort(exc.grpc_code, exc.message)
    except asyncio.CancelledError:
        record.code = grpc.StatusCode.CANCELLED.name
        raise
    except Exception:
        record.code = grpc.StatusCode.INTERNAL.name
        log.exception("unexpected error in %s (model %r)", record.endpoint, record.model)
        await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises
