"""This process's store for one upstream: at most ``max_bytes``, the least recently used entries out first.

Everything runs on the event loop without awaiting inside, so no lock is needed. An entry larger than the whole
budget is simply not stored (it would evict everything and still not fit). Entries past all use (fresh and stale
windows over) are dropped when met.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from app.upstream.cache.entry import Entry


class MemoryStore:
    shared = False

    def __init__(
        self,
        max_bytes: int,
        *,
        clock: Callable[[], float] = time.time,
        on_evict: Callable[[int], None] | None = None,
    ) -> None:
        self._max_bytes = max_bytes
        self._clock = clock
        self._on_evict = on_evict
        self._entries: OrderedDict[str, tuple[Entry, int]] = OrderedDict()  # least recently used first
        self._bytes = 0

    @property
    def bytes_held(self) -> int:
        return self._bytes

    @property
    def entries(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> Entry | None:
        held = self._entries.get(key)
        if held is None:
            return None
        entry, _ = held
        if self._clock() >= entry.keep_until():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    async def put(self, key: str, entry: Entry) -> bool:
        """Store ``entry``; False when it alone is larger than the budget (nothing is evicted for it)."""
        size = entry.size(key)
        if size > self._max_bytes:
            return False
        self._drop(key)
        if self._bytes + size > self._max_bytes:
            self._make_room(size)
        self._entries[key] = (entry, size)
        self._bytes += size
        return True

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def _drop(self, key: str) -> None:
        held = self._entries.pop(key, None)
        if held is not None:
            self._bytes -= held[1]

    def _make_room(self, size: int) -> None:
        # Least recently used first; no scan for expired entries (O(n) on every store at capacity), which are
        # the least recently used anyway unless still read, and dropped when read.
        evicted = 0
        while self._entries and self._bytes + size > self._max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._bytes -= dropped
            evicted += 1
        if evicted and self._on_evict is not None:
            self._on_evict(evicted)
