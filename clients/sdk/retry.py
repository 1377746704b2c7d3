"""Client-side retries for the idempotent calls: backoff with full jitter, Retry-After, deadline, budget.

Why these calls may be retried: Classify, Detect, Segment and ListModels change nothing on the
server; sending one twice costs compute but never changes an answer (docs/sdk.md).

What is retried: UNAVAILABLE (the gateway or its backend is down, draining, or the connection
broke), and RESOURCE_EXHAUSTED only when the server said when to come back (``retry_after``:
a full queue). RESOURCE_EXHAUSTED without it is a message over the size limit, which no
retry can fix. Errors marked ``permanent`` (the wrong kind of port) are never retried.

How long to wait: full jitter, ``uniform(0, min(max_backoff_s, initial_backoff_s * multiplier**n))``
(AWS's "exponential backoff and jitter"), but never less than the server's Retry-After. A
Retry-After longer than ``max_backoff_s`` is not waited out: the error is raised at once with
its ``retry_after``, for the caller to schedule.

Never past the caller's deadline: with a timeout, every attempt gets what is left of it and a
wait that would cross it ends the retries. And never a retry storm: a RetryBudget (a token
bucket shared by one client's calls) allows retries of at most ``budget_ratio`` of the calls
plus a burst of ``budget_floor``, so when a whole gateway is down clients add at most ~10%
load instead of multiplying it by ``max_attempts``.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

from clients.sdk.errors import ImgserveError

RETRYABLE_CODES = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})


@dataclass(frozen=True)
class RetryPolicy:
    """How a client retries; ``RetryPolicy(max_attempts=1)`` (or ``retries=0``) turns retries off."""

    max_attempts: int = 4            # the first try included
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    budget_ratio: float = 0.1        # retries allowed per call, in the long run
    budget_floor: float = 10.0       # retries allowed in a burst (the bucket's size)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")
        if self.budget_ratio < 0 or self.budget_floor < 0:
            raise ValueError("budget_ratio and budget_floor must be >= 0")

    @classmethod
    def of(cls, retries: RetryPolicy | int | None) -> RetryPolicy:
        """``retries=`` as the clients take it: a policy, a number of retries (0: none) or None (none)."""
        if isinstance(retries, RetryPolicy):
            return retries
        if retries is None:
            return cls(max_attempts=1)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be a RetryPolicy, an int >= 0 or None, not {retries!r}")
        return cls(max_attempts=retries + 1)

    def backoff(self, retry_number: int, rng: random.Random) -> float:
        """Full jitter for the ``retry_number``-th retry (1-based)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry_number - 1))
        return rng.uniform(0.0, cap)


class RetryBudget:
    """Token bucket: every call deposits ``ratio``, every retry withdraws 1; holds at most ``floor``.

    Thread-safe; one per client, shared by all its calls (and, for the async client, its tasks).
    """

    def __init__(self, ratio: float, floor: float) -> None:
        self._ratio = ratio
        self._cap = floor
        self._balance = floor
        self._lock = threading.Lock()

    def deposit(self) -> None:
        with self._lock:
            self._balance = min(self._cap, self._balance + self._ratio)

    def withdraw(self) -> bool:
        with self._lock:
            if self._balance >= 1.0:
                self._balance -= 1.0
                return True
            return False


def is_retryable(error: ImgserveError) -> bool:
    if error.permanent or error.code not in RETRYABLE_CODES:
        return False
    return error.code != "RESOURCE_EXHAUSTED" or error.retry_after is not None


class RetryState:
    """One call's retry bookkeeping: attempts so far and the deadline from the caller's timeout."""

    def __init__(self, policy: RetryPolicy, budget: RetryBudget, timeout: float | None,
                 rng: random.Random) -> None:
        self._policy = policy
        self._budget = budget
        self._rng = rng
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.attempts = 0
        budget.deposit()

    def remaining(self) -> float | None:
        """Seconds left for the next attempt (None: no client deadline)."""
        self.attempts += 1
        if self._deadline is None:
            return None
        return max(0.001, self._deadline - time.monotonic())

    def delay_before_retry(self, error: ImgserveError) -> float | None:
        """Seconds to wait before trying again, or None when ``error`` must be raised now."""
        error.attempts = self.attempts
        if self.attempts >= self._policy.max_attempts or not is_retryable(error):
            return None
        delay = self._policy.backoff(self.attempts, self._rng)
        if error.retry_after is not None:
            if error.retry_after > self._policy.max_backoff_s:
                return None  # the server asks for longer than we wait: the caller decides
            delay = max(delay, error.retry_after)
        if self._deadline is not None and time.monotonic() + delay >= self._deadline:
            return None
        if not self._budget.withdraw():
            return None
        return delay


class Retrier:
    """A client's retry policy plus its shared budget; ``start(timeout)`` begins one call."""

    def __init__(self, retries: RetryPolicy | int | None, seed: int | None = None) -> None:
        self.policy = RetryPolicy.of(retries)
        self.budget = RetryBudget(self.policy.budget_ratio, self.policy.budget_floor)
        self._rng = random.Random(seed)  # nosec B311 - backoff jitter, no secret derives from it

    def start(self, timeout: float | None) -> RetryState:
        return RetryState(self.policy, self.budget, timeout, self._rng)
