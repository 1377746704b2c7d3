"""A circuit breaker per backend server: fail fast while a server is down or hung.

Why: a Triton that is SIGSTOPped (or wedged) keeps its TCP connections open, so calls to
it do not fail - they wait out their whole deadline, and every request queued behind them
does too. The breaker turns "the health probe failed" or "a call failed UNAVAILABLE" into
an *open* state: calls in flight on that server are aborted at once with
BackendUnavailable (the caller may retry another server), and new calls are not sent
there at all. The next successful probe closes it again, so recovery is as fast as the
probe interval.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TypeVar

from serving.errors import BackendUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


class CircuitBreaker:
    """closed (calls go through) <-> open (calls fail fast); opened by ``trip``, closed by ``reset``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.reason = ""
        self.opened_at: float | None = None
        self.trips = 0
        self._open = False
        self._tripped: asyncio.Event | None = None   # set when opened; created lazily inside a loop

    @property
    def is_open(self) -> bool:
        return self._open

    def _event(self) -> asyncio.Event:
        if self._tripped is None:
            self._tripped = asyncio.Event()
            if self._open:
                self._tripped.set()
        return self._tripped

    def trip(self, reason: str) -> None:
        """Open: abort calls in flight, refuse new ones until ``reset``."""
        if self._open:
            return
        self._open = True
        self.reason = reason
        self.opened_at = time.monotonic()
        self.trips += 1
        log.warning("circuit breaker %s OPEN: %s", self.name, reason)
        if self._tripped is not None:
            self._tripped.set()

    def reset(self) -> None:
        """Closed again (a probe succeeded)."""
        if not self._open:
            return
        down = time.monotonic() - (self.opened_at or time.monotonic())
        self._open = False
        self.reason = ""
        self.opened_at = None
        self._tripped = None            # calls from now on wait on a fresh event
        log.info("circuit breaker %s closed after %.2f s", self.name, down)

    async def guard(self, call: Awaitable[T]) -> T:
        """Await ``call`` unless the breaker opens first: then cancel it and raise BackendUnavailable."""
        if self._open:
            if asyncio.iscoroutine(call):
                call.close()
            raise BackendUnavailable(f"{self.name} is unavailable (circuit open: {self.reason})")
        tripped = self._event()
        task = asyncio.ensure_future(call)
        waiter = asyncio.ensure_future(tripped.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            waiter.cancel()
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise BackendUnavailable(f"{self.name} became unavailable during the call ({self.reason})")
