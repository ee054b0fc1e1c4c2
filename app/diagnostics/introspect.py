"""Snapshots of threads and asyncio tasks, safe to take from a running gateway without disturbing it."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Coroutine, Generator
from typing import Any

MAX_FRAMES = 20


class TaskAges:
    """A task factory that stamps each task's creation time (asyncio keeps none), for /debug/tasks."""

    def __init__(self) -> None:
        self._created: weakref.WeakKeyDictionary[asyncio.Future[Any], float] = weakref.WeakKeyDictionary()
        self._previous: Any = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._previous = loop.get_task_factory()

        def factory(
            loop: asyncio.AbstractEventLoop,
            coro: Coroutine[Any, Any, Any] | Generator[Any, None, Any],
            **kwargs: Any,
        ) -> asyncio.Future[Any]:
            if self._previous is not None:
                task: asyncio.Future[Any] = self._previous(loop, coro, **kwargs)
            else:
                task = asyncio.Task(coro, loop=loop, **kwargs)
            self._created[task] = time.monotonic()
            return task

        loop.set_task_factory(factory)

    def uninstall(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.set_task_factory(self._previous)

    def age_s(self, task: asyncio.Future[Any]) -> float | None:
        created = self._created.get(task)
        return None if created is None else round(time.monotonic() - created, 3)


def _frames(stack: traceback.StackSummary) -> list[str]:
    return [f"{f.filename}:{f.lineno} in {f.name}" for f in stack]


def task_snapshot(ages: TaskAges | None = None) -> list[dict[str, Any]]:
    """Every task of the running loop: name, coroutine, its stack (innermost last), and its age."""
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
