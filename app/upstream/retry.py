"""Retry policy: which failures are worth another try, how long to wait, and a budget against retry storms."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from app.errors import SourceError, UpstreamConnectError, UpstreamStatusError, UpstreamTimeoutError
from app.settings import RetryPolicy
from app.upstream.window import SlidingCounts

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})


def is_transient(err: SourceError) -> bool:
    if isinstance(err, UpstreamConnectError | UpstreamTimeoutError):
        return True
    return isinstance(err, UpstreamStatusError) and err.status in RETRYABLE_STATUSES


def backoff_s(policy: RetryPolicy, retry_number: int, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, initial * 2**(n-1))]."""
    ceiling = min(policy.backoff_max_ms, policy.backoff_initial_ms * 2 ** (retry_number - 1)) / 1000
    return rng.uniform(0, ceiling)


def parse_retry_after(value: str | None, *, max_s: float = 60.0) -> float | None:
    """Seconds from a Retry-After header (delta-seconds form only; HTTP dates from upstreams are rare)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if seconds != seconds or seconds < 0:
        return None
    return min(seconds, max_s)


class RetryBudget:
    """Retries at most ``budget_ratio`` of calls over a sliding window (plus a floor for low traffic), so a
    struggling upstream sees at most (1 + ratio) times its normal load, never attempts-times."""

    def __init__(self, policy: RetryPolicy, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._policy = policy
        self._counts = SlidingCounts(policy.budget_window_s, clock=clock)

    def record_call(self) -> None:
        self._counts.add(calls=1)

    def try_spend(self) -> bool:
        calls, retries = self._counts.totals()
        allowed = max(self._policy.budget_min_retries, int(self._policy.budget_ratio * calls))
        if retries >= allowed:
            return False
        self._counts.add(failures=1)
        return True
