"""A bounded thread executor: at most ``workers`` jobs run and ``queue_limit`` wait; the rest fail at once."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from app.concurrency import run_in_own_thread
from app.errors import ResourceClosedError

T = TypeVar("T")


class ExecutorFullError(Exception):
    """Every worker is busy and the queue is full; the job was not queued."""


class ExecutorObserver(Protocol):
    """Metrics hook: called from worker threads, so implementations must be thread-safe and quick."""

    def job_started(self, queue_wait_s: float) -> None: ...
    def job_finished(self, run_s: float) -> None: ...
    def job_rejected(self) -> None: ...


@dataclass(frozen=True)
class ExecutorStats:
    capacity: int
    queue_limit: int
    busy: int
    queued: int
    completed: int
    rejected: int


class BoundedExecutor:
    def __init__(self, *, name: str, workers: int, queue_limit: int, observer: ExecutorObserver | None = None) -> None:
        self.name = name
        self.workers = workers
        self.queue_limit = queue_limit
        self._observer = observer
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._pending = 0  # queued + running
        self._busy = 0
        self._completed = 0
        self._rejected = 0
        self._closed = False
        self._running: dict[int, float] = {}  # thread ident -> when its current job started

    def running_threads(self) -> dict[int, float]:
        """Idents of the worker threads running a job now, with the job's start (perf_counter)."""
        with self._lock:
            return dict(self._running)

    def stats(self) -> ExecutorStats:
        with self._lock:
            return ExecutorStats(
                capacity=self.workers,
                queue_limit=self.queue_limit,
                busy=self._busy,
                queued=self._pending - self._busy,
                completed=self._completed,
                rejected=self._rejected,
            )

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Queue ``fn`` or refuse at once.

        Raises ExecutorFullError when ``workers + queue_limit`` jobs are already pending, ResourceClosedError
        after aclose().
        """
        with self._lock:
            if self._closed:
                raise ResourceClosedError(f"executor {self.name} is closed")
            if self._pending >= self.workers + self.queue_limit:
                self._rejected += 1
                rejected = True
            else:
                self._pending += 1
                rejected = False
        if rejected:
            if self._observer is not None:
                self._observer.job_rejected()
            raise ExecutorFullError(f"executor {self.name} is full")
        submitted = time.perf_counter()
        # In the caller's context (a copy: O(1)), so that what the job logs carries the request's trace ids.
        future = self._pool.submit(contextvars.copy_context().run, self._run, fn, submitted)
        # The slot is released when the job ends or is cancelled before it started, never when an awaiting
        # coroutine gives up: a thread still running a query still occupies its worker.
        future.add_done_callback(self._release)
        return future

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a worker thread and await its result (see submit() for what it raises)."""
        return await asyncio.wrap_future(self.submit(fn))

    def _run(self, fn: Callable[[], T], submitted: float) -> T:
        started = time.perf_counter()
        with self._lock:
            self._busy += 1
            self._running[threading.get_ident()] = started
        if self._observer is not None:
            self._observer.job_started(started - submitted)
        try:
            return fn()
        finally:
            with self._lock:
                self._busy -= 1
                self._completed += 1
                self._running.pop(threading.get_ident(), None)
            if self._observer is not None:
                self._observer.job_finished(time.perf_counter() - started)

    def _release(self, _: Future[Any]) -> None:
        with self._lock:
            self._pending -= 1

    async def aclose(self) -> None:
        """Refuse new jobs, drop queued ones, and wait for running ones to finish."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        await run_in_own_thread(
            lambda: self._pool.shutdown(wait=True, cancel_futures=True), name=f"{self.name}-shutdown"
        )
