"""Event-loop lag sampler: a background task that measures how late the loop runs a timer."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable

from prometheus_client import Histogram


class LoopLagSampler:
    def __init__(
        self,
        histogram: Histogram,
        *,
        interval_s: float = 0.1,
        window_s: float = 10.0,
        on_sample: Callable[[float], None] | None = None,
    ) -> None:
        """``on_sample``: called with every lag measured, in seconds (admission control steers by it)."""
        self._histogram = histogram
        self._on_sample = on_sample
        self._interval = interval_s
        self._task: asyncio.Task[None] | None = None
        # (perf_counter when taken, lag) of the samples over the last window.
        self._recent: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=max(1, int(window_s / interval_s))
        )
        self._due = float("inf")  # when the next sample is due (perf_counter)

    def worst_recent_s(self) -> float:
        """The worst lag over the last window (about ``window_s``)."""
        return max((lag for _, lag in self._recent), default=0.0)

    def stall_within(self, seconds: float) -> float:
        """How long the loop stood still, at worst, within the last ``seconds``: each sample's lag cut to the part
        of it inside that window (a stall that ended before the window began is none of its business), and the
        same for the sample due now that has not run yet. Read by the task a timer has just woken, this sees a
        stall that ended a moment ago even when that task runs before the sampler's, whose timer expired in the
        same stall. It falls short of the real stall by up to one sampling interval (the sample may have fallen
        due late in it), and a stall shorter than the interval may go unseen."""
        now = time.perf_counter()
        since = now - seconds
        worst = max(0.0, now - max(self._due, since))
        for taken, lag in reversed(self._recent):
            if taken < since:
                break
            worst = max(worst, min(lag, taken - since))
        return worst

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="loop-lag-sampler")

    async def _run(self) -> None:
        try:
            while True:
                self._due = time.perf_counter() + self._interval
                await asyncio.sleep(self._interval)
                now = time.perf_counter()
                lag = max(0.0, now - self._due)
                self._histogram.observe(lag)
                self._recent.append((now, lag))
                if self._on_sample is not None:
                    self._on_sample(lag)
        finally:
            # However the sampler ends, no sample is due any more: an ever later one would read as a stall.
            self._due = float("inf")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
