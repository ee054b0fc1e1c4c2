"""Snapshots of threads and asyncio tasks, safe to take from a running gateway without disturbing it."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from typing import Any

MAX_FRAMES = 20


class TaskAges:
    """When each task was first seen, for /debug/tasks: asyncio keeps no creation time.

    A task factory stamping every task was measured at 7 % of the event loop's CPU on a fan-out request (py-spy
    under the benchmark's load), and a Python factory also takes uvloop's fast path for creating tasks away. So a
    census every ``interval_s`` notes the tasks it has not seen before instead: an age is a lower bound, short by
    less than the interval, and a task younger than the interval may show 0. The long-lived tasks an operator looks
    for (a stuck coroutine) are the ones it measures well.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self._first_seen: weakref.WeakKeyDictionary[asyncio.Task[Any], float] = weakref.WeakKeyDictionary()
        self._census: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._census = asyncio.get_running_loop().create_task(self._run(), name="task-census")

    async def aclose(self) -> None:
        if self._census is not None:
            self._census.cancel()
            await asyncio.wait({self._census})
            self._census = None

    async def _run(self) -> None:
        while True:
            self.census()
            await asyncio.sleep(self.interval_s)

    def census(self) -> None:
        now = time.monotonic()
        seen = self._first_seen
        for task in asyncio.all_tasks():
            if task not in seen:
                seen[task] = now

    def age_s(self, task: asyncio.Task[Any]) -> float | None:
        created = self._first_seen.get(task)
        return None if created is None else round(time.monotonic() - created, 3)


def _frames(stack: traceback.StackSummary) -> list[str]:
    return [f"{f.filename}:{f.lineno} in {f.name}" for f in stack]


def task_snapshot(ages: TaskAges | None = None) -> list[dict[str, Any]]:
    """Every task of the running loop: name, coroutine, its stack (innermost last), and its age."""
    if ages is not None:
        ages.census()  # tasks new since the last census: first seen now
    out = []
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        frames = task.get_stack(limit=MAX_FRAMES)
        stack = traceback.StackSummary.extract((f, f.f_lineno) for f in frames)
        out.append(
            {
                "name": task.get_name(),
                "coroutine": getattr(coro, "__qualname__", type(coro).__name__),
                "age_s": ages.age_s(task) if ages is not None else None,
                "done": task.done(),
                "stack": _frames(stack),
            }
        )
    out.sort(key=_age, reverse=True)
    return out


def _age(task: dict[str, Any]) -> float:
    age = task["age_s"]
    return float(age) if isinstance(age, int | float) else 0.0


def thread_snapshot(busy: Callable[[int], float | None] | None = None) -> list[dict[str, Any]]:
    """Every thread with its stack; ``busy(ident)`` returns since when a pool thread runs a job, or None."""
    frames = sys._current_frames()
    now = time.perf_counter()
    out = []
    for thread in threading.enumerate():
        ident = thread.ident or 0
        frame = frames.get(ident)
        stack = traceback.extract_stack(frame, limit=MAX_FRAMES) if frame is not None else traceback.StackSummary()
        since = busy(ident) if busy is not None else None
        out.append(
            {
                "name": thread.name,
                "ident": ident,
                "daemon": thread.daemon,
                "busy": since is not None,
                "busy_for_s": round(now - since, 3) if since is not None else None,
                "stack": _frames(stack),
            }
        )
    return out


def format_dump(threads: list[dict[str, Any]], tasks: list[dict[str, Any]]) -> str:
    lines = [f"=== {len(threads)} threads ==="]
    for t in threads:
        state = f"busy {t['busy_for_s']} s" if t["busy"] else "idle or unknown"
        lines.append(f"--- thread {t['name']} ({t['ident']}, {state})")
        lines.extend(f"    {frame}" for frame in t["stack"])
    lines.append(f"=== {len(tasks)} asyncio tasks ===")
    for task in tasks:
        lines.append(f"--- task {task['name']} {task['coroutine']} age {task['age_s']} s")
        lines.extend(f"    {frame}" for frame in task["stack"])
    return "\n".join(lines)
