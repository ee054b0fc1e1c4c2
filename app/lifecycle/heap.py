"""The garbage collector once the gateway is ready.

Everything allocated until then lives as long as the process, so it is moved out of the collector's sight
(gc.freeze). A full collection then walks only what requests allocate, instead of the hundreds of thousands of
objects of FastAPI, pydantic and numpy: in a burst of thousands of connections this turned full-collection pauses of
50-130 ms on the event loop into a few milliseconds.

Then the thresholds (``server.gc_thresholds``). With Python's default (700, 10, 10), a gateway under load
collects its youngest generation thousands of times a minute, each time promoting the objects of requests still
in flight, which then make the older collections slow too: 570 µs of collection per request at N = 8 in the
fan-out benchmark (15-19 % of the CPU, measured with gc.callbacks). At (5000, 20, 20): 90 µs, with young
collections of at most 4.7 ms. Reference counting still frees everything that is not in a cycle at once; the
thresholds only decide how often cycles are looked for.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence


def freeze_startup_heap(thresholds: Sequence[int] | None = None) -> None:
    gc.collect()  # garbage made during start-up is freed, not frozen
    gc.freeze()
    if thresholds is not None:
        gc.set_threshold(*thresholds)
