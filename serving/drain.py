"""HTTP behaviour during a drain (SIGTERM/SIGINT), as an aiohttp middleware.

Why: a drain has two phases (serving/app.py ``Gateway.stop``). While *draining*, health
and readiness already say NOT_SERVING but requests are still served, so that load
balancers can stop sending without anyone getting an error; every response then carries
``Connection: close`` so keep-alive clients reconnect (to another replica) instead of
reusing a connection that is about to go. While *refusing*, new requests are answered at
once with 503 + ``Retry-After`` + ``Connection: close`` - never a reset - while requests
already admitted finish. Health, readiness and metrics stay answerable throughout, so a
prober can watch the drain.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web

from serving.errors import ShuttingDown

# paths a prober or scraper uses; they answer in every phase
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class DrainPhase(Protocol):
    """What the middleware needs to know of the gateway."""

    draining: bool
    refusing: bool


def drain_middleware(state: DrainPhase) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """The middleware over ``state`` (the Gateway); put it outermost."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not state.draining or request.path in EXEMPT_PATHS:
            return await handler(request)
        if state.refusing:
            # imported here: http.py is the one place that knows the two error body shapes
            from serving.transports.http import error_response
            error = ShuttingDown()
            response: web.StreamResponse = error_response(request, error.http_status, error.code_name,
                                                          error.message, error.retry_after_s)
        else:
            response = await handler(request)
        response.force_close()          # sends Connection: close; the client reconnects elsewhere
        return response

    return middleware
