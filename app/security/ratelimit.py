"""Rate limits per API key or token subject: a token bucket per key, behind a Protocol so that a shared backend
(Redis) can stand in for the in-process one when several replicas must share one limit."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    remaining: float  # tokens left after this request
    retry_after_s: float  # 0 when allowed: how long until one token is back

    @property
    def retry_after_header(self) -> int:
        # Whole seconds (RFC 9110), never 0: "retry at once" would invite a tight loop.
        return max(1, math.ceil(self.retry_after_s))


class RateLimiter(Protocol):
    """One token bucket per key: ``burst`` tokens at most, refilled at ``rate_per_s``; a request takes one."""

    async def start(self) -> None: ...
    async def aclose(self) -> None: ...

    async def acquire(self, key: str, rate_per_s: float, burst: int) -> Decision:
        """Take a token if there is one. Raises RateLimitBackendError when a shared backend cannot answer."""
        ...


def take(tokens: float, elapsed_s: float, rate_per_s: float, burst: int) -> tuple[float, Decision]:
    """The token-bucket step, shared by every backend's reference behaviour: refill, then take one if whole."""
    tokens = min(float(burst), tokens + max(0.0, elapsed_s) * rate_per_s)
    if tokens >= 1.0:
        return tokens - 1.0, Decision(True, tokens - 1.0, 0.0)
    return tokens, Decision(False, tokens, (1.0 - tokens) / rate_per_s)


# Buckets kept, at most: API keys are bounded by the config, but token subjects are not.
MAX_BUCKETS = 100_000


class LocalRateLimiter:
    """Buckets in this process's memory: exact for one replica; N replicas allow N times the rate.

    At most ``max_buckets``, least recently used forgotten first: a forgotten bucket comes back full, which its key
    had earned anyway unless it was used again within burst / rate seconds. Everything runs on the event loop
    without awaiting, so no lock is needed.
    """

    def __init__(self, *, max_buckets: int = MAX_BUCKETS) -> None:
        self._max_buckets = max_buckets
        # In least-recently-used order: a key is popped and put back at the end on every request.
        self._buckets: dict[str, tuple[float, float]] = {}

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        self._buckets.clear()

    async def acquire(self, key: str, rate_per_s: float, burst: int) -> Decision:
        now = time.monotonic()
        tokens, last = self._buckets.pop(key, (float(burst), now))
        tokens, decision = take(tokens, now - last, rate_per_s, burst)
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self._max_buckets:
            del self._buckets[next(iter(self._buckets))]
        return decision
