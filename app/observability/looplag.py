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
        self._recent: collections.deque[float] = collections.deque(maxlen=max(1, int(window_s / interval_s)))

    def worst_recent_s(self) -> float:
        """The worst lag over the last window (about ``window_s``)."""
        return max(self._recent, default=0.0)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="loop-lag-sampler")

    async def _run(self) -> None:
        while True:
            expected = time.perf_counter() + self._interval
            await asyncio.sleep(self._interval)
            lag = max(0.0, time.perf_counter() - expected)
            self._histogram.observe(lag)
            self._recent.append(lag)
            if self._on_sample is not None:
                self._on_sample(lag)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
