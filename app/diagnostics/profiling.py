"""On-demand profiles of the event-loop thread with pyinstrument, rendered for speedscope or as HTML."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from pyinstrument import Profiler
from pyinstrument.frame import SELF_TIME_FRAME_IDENTIFIER, Frame
from pyinstrument.frame_ops import delete_frame_from_tree
from pyinstrument.renderers import HTMLRenderer, SpeedscopeRenderer

from app.errors import ProfilerBusyError

# Where the loop thread sits while it waits for I/O: their own time is idle, not CPU.
_IDLE_FUNCTIONS = frozenset({"run_forever", "run_until_complete", "_run_once", "select", "poll", "run"})


def remove_loop_idle(frame: Frame | None, options: dict[str, Any]) -> Frame | None:
    """A pyinstrument processor: drop the loop's own waiting time, keeping what ran on the loop (CPU)."""
    if frame is None:
        return None
    for child in list(frame.children):
        if child.identifier == SELF_TIME_FRAME_IDENTIFIER and frame.function in _IDLE_FUNCTIONS:
            delete_frame_from_tree(child, replace_with="nothing")
        else:
            remove_loop_idle(child, options)
    return frame


class LoopProfiler:
    """One profile at a time; the profile samples the loop thread while the requested seconds pass."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()

    async def profile(self, seconds: float, mode: Literal["cpu", "wall"], fmt: Literal["speedscope", "html"]) -> str:
        """Raises ProfilerBusyError when another profile is running."""
        if self._lock.locked():
            raise ProfilerBusyError("one profile at a time; try again when the current one ends")
        async with self._lock:
            profiler = Profiler(interval=0.001, async_mode="disabled")
            profiler.start()
            try:
                await asyncio.sleep(seconds)
            finally:
                session = profiler.stop()
        if fmt == "html":
            html = HTMLRenderer()
            if mode == "cpu":
                html.preprocessors = [*html.preprocessors, remove_loop_idle]
            out: str = html.render(session)
            return out
        speedscope = SpeedscopeRenderer()
        if mode == "cpu":
            speedscope.processors = [*speedscope.processors, remove_loop_idle]
        out = speedscope.render(session)
        return out
