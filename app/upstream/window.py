"""Counts over a sliding time window, in one-tenth-window buckets: O(1) memory whatever the traffic."""

from __future__ import annotations

import time
from collections.abc import Callable

_BUCKETS = 10


class SlidingCounts:
    def __init__(self, window_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._width = window_s / _BUCKETS
        self._clock = clock
        # Each bucket: [bucket index, calls, second count (failures or retries)]
        self._buckets: list[list[float]] = [[-1, 0, 0] for _ in range(_BUCKETS)]

    def _bucket(self) -> list[float]:
        index = int(self._clock() / self._width)
        bucket = self._buckets[index % _BUCKETS]
        if bucket[0] != index:
            bucket[0], bucket[1], bucket[2] = index, 0, 0
        return bucket

    def add(self, *, calls: int = 0, failures: int = 0) -> None:
        bucket = self._bucket()
        bucket[1] += calls
        bucket[2] += failures

    def totals(self) -> tuple[int, int]:
        oldest = int(self._clock() / self._width) - _BUCKETS + 1
        calls = failures = 0
        for index, c, f in self._buckets:
            if index >= oldest:
                calls += int(c)
                failures += int(f)
        return calls, failures

    def clear(self) -> None:
        for bucket in self._buckets:
            bucket[0], bucket[1], bucket[2] = -1, 0, 0
