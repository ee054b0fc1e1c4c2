"""A thread that lets go of large buffers off the event loop.

Unmapping 64 MiB of shared memory returns 16k pages to the kernel: some 12 ms of CPU, and 30 ms of wall time, in
``munmap`` and the last ``close``. CPython releases the GIL around both, so done here they cost the loop nothing;
done where a request ends, they would stall every other request for that long. Names are unlinked by their owners
before anything is handed over: what reaches this thread is memory only, never a /dev/shm entry.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable
from typing import Protocol

from app.concurrency import run_in_own_thread

log = logging.getLogger(__name__)


class Closable(Protocol):
    def close(self) -> None: ...


class Reaper:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[list[Closable], list[object]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cpu-reaper", daemon=True)
        self._thread.start()

    def dispose(self, *, close: Iterable[Closable] = (), drop: Iterable[object] = ()) -> None:
        """Close ``close`` and let go of ``drop`` in the reaper thread (here, when it is not running).

        The caller must hold no other reference it still uses: the last reference goes away over there.
        """
        item = (list(close), list(drop))
        if self._thread is None or not self._thread.is_alive():
            self._release(item)
            return
        self._queue.put(item)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            self._release(item)
            del item

    @staticmethod
    def _release(item: tuple[list[Closable], list[object]]) -> None:
        closables, _ = item
        for obj in closables:
            try:
                obj.close()
            except Exception:
                log.exception("releasing %r failed", obj)
        item[0].clear()
        item[1].clear()

    async def aclose(self) -> None:
        """Release everything queued, then stop the thread."""
        thread = self._thread
        if thread is None:
            return
        self._queue.put(None)
        await run_in_own_thread(thread.join, name="cpu-reaper-join")
        self._thread = None
