"""Blocking-call detector: names the code that holds the event loop, while it holds it.

A heartbeat callback on the loop stamps the time; a watchdog thread checks the stamp. When the loop has not beaten
for longer than the threshold, the watchdog samples the loop thread's stack with sys._current_frames() (while the
loop is still stuck, so the stack is the culprit's, not whatever runs after) and logs one warning per stall. This
works under uvloop, where asyncio's slow-callback debug log and Handle._run patches see nothing.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback

from prometheus_client import Counter

log = logging.getLogger("app.observability.blocking")

MAX_FRAMES = 25


class BlockingDetector:
    def __init__(self, counter: Counter, *, threshold_s: float) -> None:
        self._counter = counter
        self._threshold = threshold_s
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread_id = threading.get_ident()
        self._heartbeat()
        self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        self._beat = time.monotonic()
        assert self._loop is not None
        self._handle = self._loop.call_later(self._threshold / 4, self._heartbeat)

    def _watch(self) -> None:
        reported_beat = -1.0
        while not self._stop.wait(self._threshold / 4):
            beat = self._beat
            stalled = time.monotonic() - beat
            if stalled < self._threshold or beat == reported_beat:
                continue
            frame = sys._current_frames().get(self._loop_thread_id)
            if frame is None:
                continue
            reported_beat = beat
            stack = traceback.extract_stack(frame, limit=MAX_FRAMES)
            culprit = stack[-1] if stack else None
            self._counter.inc()
            log.warning(
                "event loop blocked for %.0f ms in %s",
                stalled * 1000,
                _describe(culprit),
                extra={
                    "event": "loop_blocked",
                    "blocked_ms": round(stalled * 1000, 1),
                    "function": culprit.name if culprit else None,
                    "location": f"{culprit.filename}:{culprit.lineno}" if culprit else None,
                    "stack": [f"{f.filename}:{f.lineno} in {f.name}" for f in stack],
                },
            )

    async def aclose(self) -> None:
        self._stop.set()
        if self._handle is not None:
            self._handle.cancel()
        if self._thread is not None:
            self._thread.join(timeout=1)


def _describe(frame: traceback.FrameSummary | None) -> str:
    if frame is None:
        return "unknown code"
    return f"{frame.name} ({frame.filename}:{frame.lineno})"
