"""A circuit breaker per upstream: stop sending to an upstream that keeps failing, probe it, close on success.

CLOSED ──(N consecutive failures, or failure rate ≥ r over ≥ min_calls in the window)──▶ OPEN
OPEN ──(open_ms elapsed; next call)──▶ HALF_OPEN: at most `half_open_probes` calls at once go through
HALF_OPEN ──(probe succeeds)──▶ CLOSED        HALF_OPEN ──(probe fails)──▶ OPEN
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from app.settings import BreakerPolicy
from app.upstream.window import SlidingCounts


class BreakerState(enum.IntEnum):
    # Values are the exported gauge values.
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Not thread-safe: used only from the event loop, where no await separates a check from its update."""

    def __init__(
        self,
        policy: BreakerPolicy,
        *,
        on_transition: Callable[[BreakerState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._on_transition = on_transition
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._window = SlidingCounts(policy.window_s, clock=clock)
        self._opened_at = 0.0
        self._probes = 0

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self._policy.open_ms / 1000:
            return BreakerState.HALF_OPEN
        return self._state

    def retry_after_s(self) -> float:
        """Seconds until an open breaker lets a probe through (0 unless open)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self._policy.open_ms / 1000 - self._clock())

    def try_acquire(self) -> bool:
        """May a call go out now? A True from a half-open breaker is a probe permit: report its outcome with
        record_success/record_failure, or give it back with release_probe when the call never completed."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        if self._state is BreakerState.OPEN:
            self._transition(BreakerState.HALF_OPEN)
        if self._probes >= self._policy.half_open_probes:
            return False
        self._probes += 1
        return True

    def release_probe(self) -> None:
        if self._state is BreakerState.HALF_OPEN and self._probes > 0:
            self._probes -= 1

    def record_success(self) -> None:
        self._consecutive = 0
        self._window.add(calls=1)
        if self._state is BreakerState.HALF_OPEN:
            self._probes = max(0, self._probes - 1)
            self._window.clear()
            self._transition(BreakerState.CLOSED)

    def record_failure(self) -> None:
        self._consecutive += 1
        self._window.add(calls=1, failures=1)
        if self._state is BreakerState.HALF_OPEN:
            self._probes = max(0, self._probes - 1)
            self._open()
            return
        if self._state is BreakerState.CLOSED and self._should_open():
            self._open()

    def _should_open(self) -> bool:
        if self._consecutive >= self._policy.consecutive_failures:
            return True
        calls, failures = self._window.totals()
        return calls >= self._policy.min_calls and failures / calls >= self._policy.failure_rate

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._consecutive = 0
        self._window.clear()
        self._transition(BreakerState.OPEN)

    def _transition(self, to: BreakerState) -> None:
        if self._state is to:
            return
        self._state = to
        if to is not BreakerState.HALF_OPEN:
            self._probes = 0
        if self._on_transition is not None:
            self._on_transition(to)
