"""The HTTP listener's slow-client limits: a header timeout on top of aiohttp's keep-alive timeout.

aiohttp closes a connection that sits idle for ``keepalive_timeout`` but has no limit on
how long the request line and headers may take once bytes trickle in: a client sending a
byte every few seconds (slowloris) holds a connection open for as long as it likes. Here
every connection must deliver a complete request head within ``header_timeout_s`` of
connecting, and every later request within ``header_timeout_s`` of its first byte; else
the connection is closed. Body timeouts live in serving/transports/http.py (read_body),
where a late body can still get a 408 answer.

aiohttp offers no public hook for this, so GuardedRequestHandler subclasses its
RequestHandler and reads its parsed-request counter; tests/test_security_http.py pins the
behaviour so an aiohttp upgrade that moves those internals fails loudly.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

log = logging.getLogger("imgserve.http")


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol with a deadline for each request's head."""

    def __init__(self, manager: web.Server, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self._awaiting_head = True   # between requests: the next bytes are a request line and headers

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head and self._header_timer is None:
            self._arm()
        parsed_before = self._request_count
        super().data_received(data)
        if self._request_count > parsed_before:  # a complete head was parsed
            self._awaiting_head = False
            self._disarm()

    async def finish_response(self, request: Any, resp: Any, start_time: Any) -> Any:
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            if getattr(resp, "status", None) == 408:
                # the body was too slow: close once the 408 is flushed, instead of lingering for the rest
                self.force_close()
            elif not self._messages:  # nothing pipelined behind it: the next bytes start a new head
                self._awaiting_head = True

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = asyncio.get_running_loop().call_later(self._header_timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _expire(self) -> None:
        self._header_timer = None
        if self._awaiting_head and self.transport is not None:
            log.debug("closing a connection whose request head took over %.1f s", self._header_timeout_s)
            self.force_close()


class GuardedServer(web.Server):
    """web.Server that builds GuardedRequestHandler connections."""

    header_timeout_s: float = 10.0

    def __call__(self) -> web.RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, header_timeout_s=self.header_timeout_s, **self._kwargs)


# After answering a request whose body it did not read (413, 408, 401 on an upload), aiohttp keeps
# reading ("lingering") so the client can finish sending and see the answer; its default of 10 s
# would let a slow-body client hold the connection that long after its 408.
LINGERING_S = 2.0


class GuardedAppRunner(web.AppRunner):
    """AppRunner whose connections enforce ``header_timeout_s`` (pass keepalive_timeout as usual)."""

    def __init__(self, app: web.Application, *, header_timeout_s: float, **kwargs: Any) -> None:
        kwargs.setdefault("lingering_time", LINGERING_S)
        super().__init__(app, **kwargs)
        self._header_timeout_s = header_timeout_s

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = GuardedServer  # same object and state, only the connection factory differs
        server.header_timeout_s = self._header_timeout_s  # type: ignore[attr-defined]
        return server
