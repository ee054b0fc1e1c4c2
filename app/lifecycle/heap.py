"""The garbage collector once the gateway is ready: the start-up heap frozen, and cycles looked for on a clock.

Everything allocated until ready lives as long as the process, so it is moved out of the collector's sight
(gc.freeze). A full collection then walks only what requests allocate, instead of the hundreds of thousands of
objects of FastAPI, pydantic and numpy: in a burst of thousands of connections this turned full-collection pauses of
50-130 ms on the event loop into a few milliseconds.

Then when to collect (``server.gc_interval_s``). A request that succeeds makes no reference cycle: reference
counting frees all of it. Python's collector still runs by allocation count, and under load the count is driven
by the requests in flight, not by garbage: each young collection promotes the live objects of every request in
flight, whose frees then no longer lower the count (it cannot go below zero), so the next collection is due again
within about one request's lifetime. At (5000, 20, 20) that was a young collection every 17 requests at N = 8,
each walking the 4,000-8,000 objects in flight for 2.5-3.5 ms and finding nothing: about 130 µs of CPU per request
and a pause on the loop every 20 ms. Driven by a clock instead (``ClockedCollector``: the count trigger off,
gc.collect(0) every interval, the middle generation every 10th, everything every 100th), the pauses are the same
size and come once a second. What a failure's exception leaves in a cycle (a traceback holding its frame) waits
at most one interval to be freed. ``gc_interval_s = 0`` keeps Python's own trigger, with ``gc_thresholds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Sequence

from prometheus_client import Histogram

MIDDLE_EVERY = 10  # ticks between collections of the middle generation
FULL_EVERY = 100  # ticks between full collections (the frozen start-up heap is never walked)


def freeze_startup_heap(thresholds: Sequence[int] | None = None) -> None:
    gc.collect()  # garbage made during start-up is freed, not frozen
    gc.freeze()
    if thresholds is not None:
        gc.set_threshold(*thresholds)  # used while the count trigger is on (no clock, or after it stops)


class ClockedCollector:
    """The collector driven by the loop's clock: a resource of the lifespan (app/lifecycle/lifespan.py).

    ``interval_s`` None or 0: nothing changes, Python's count trigger stays. Otherwise start() turns the count trigger
    off and a task collects every ``interval_s``, each pause observed in ``pauses`` by generation; aclose() turns
    the count trigger back on if it was on."""

    def __init__(self, interval_s: float | None, pauses: Histogram | None = None) -> None:
        self.interval_s = interval_s
        self._pauses = pauses
        self._task: asyncio.Task[None] | None = None
        self._was_enabled = False

    async def start(self) -> None:
        if not self.interval_s:
            return
        self._was_enabled = gc.isenabled()
        gc.disable()
        self._task = asyncio.create_task(self._run(self.interval_s), name="gc-clock")

    async def _run(self, interval_s: float) -> None:
        tick = 0
        while True:
            await asyncio.sleep(interval_s)
            tick += 1
            generation = 2 if tick % FULL_EVERY == 0 else 1 if tick % MIDDLE_EVERY == 0 else 0
            self.collect(generation)

    def collect(self, generation: int) -> None:
        started = time.perf_counter()
        gc.collect(generation)
        if self._pauses is not None:
            self._pauses.labels(str(generation)).observe(time.perf_counter() - started)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            if self._was_enabled:
                gc.enable()
