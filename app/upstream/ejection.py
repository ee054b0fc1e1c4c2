"""Passive outlier ejection: an endpoint that keeps failing leaves the rotation for a while, then comes back.

ACTIVE ──(consecutive_failures connect errors, timeouts or 5xx, and fewer than max_ejection_percent ejected)──▶
EJECTED for min(base_ejection_ms * n, max_ejection_ms), n growing by one per ejection and shrinking by one per
base_ejection_ms spent healthy since the last return ──(the time has passed; next pick)──▶ ACTIVE

Never every endpoint at once: a whole upstream failing is its circuit breaker's business (app/upstream/breaker.py).
Pure bookkeeping, no I/O; the clock is injected.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.settings import OutlierPolicy


@dataclass(slots=True)
class OutlierState:
    """One endpoint's record, kept on the endpoint."""

    consecutive: int = 0
    ejections: int = 0  # in all, for the metrics and /debug
    multiplier: int = 0
    ejected_until: float | None = None
    returned_at: float = 0.0


class OutlierDetector:
    def __init__(self, policy: OutlierPolicy, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock

    def max_ejected(self, endpoints: int) -> int:
        """How many of ``endpoints`` may be out at once: the percentage, at least one when it is not 0 (a 10 %
        limit must still let one of three go), and never all of them."""
        pct = self.policy.max_ejection_percent
        if pct == 0 or endpoints < 2:
            return 0
        return min(endpoints - 1, max(1, math.floor(endpoints * pct / 100)))

    def succeeded(self, state: OutlierState) -> None:
        state.consecutive = 0

    def failed(self, state: OutlierState, *, endpoints: int, ejected: int) -> bool:
        """Count a failure; True when it ejects the endpoint (``ejected``: how many are out already)."""
        if state.ejected_until is not None:
            return False  # a call sent before the ejection, finishing now
        state.consecutive += 1
        if state.consecutive < self.policy.consecutive_failures or ejected >= self.max_ejected(endpoints):
            return False
        now = self.clock()
        base = self.policy.base_ejection_ms / 1000
        if state.ejections:
            healthy_for = max(0.0, now - state.returned_at)
            state.multiplier = max(0, state.multiplier - int(healthy_for / base))
        state.multiplier += 1
        state.ejections += 1
        state.consecutive = 0
        state.ejected_until = now + min(base * state.multiplier, max(base, self.policy.max_ejection_ms / 1000))
        return True

    def due(self, state: OutlierState, now: float) -> bool:
        """Return an endpoint whose time is up; True when it did."""
        if state.ejected_until is None or now < state.ejected_until:
            return False
        state.ejected_until = None
        state.returned_at = now
        state.consecutive = 0
        return True
