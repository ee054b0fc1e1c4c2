"""The CPU process pool: a pebble ProcessPool (kills and replaces a worker whose job overruns its timeout)
behind a bounded admission count, so excess jobs are refused at once instead of queueing without limit."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeoutError
from dataclasses import dataclass
from typing import Any, TypeVar

import pebble

from app.compute.worker import init_worker, ping
from app.concurrency import run_in_own_thread
from app.errors import OverloadedError, ResourceClosedError
from app.lifecycle.children import group_signals_blocked
from app.settings import ComputeSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class PoolStats:
    capacity: int
    queue_limit: int
    pending: int
    worker_pids: list[int]


class CpuPool:
    def __init__(self, settings: ComputeSettings) -> None:
        self._settings = settings
        self._pool: pebble.ProcessPool | None = None
        self._lock = threading.Lock()
        self._pending = 0
        self._closed = False
        self.worker_pids: list[int] = []

    @property
    def capacity(self) -> int:
        return self._settings.workers

    async def start(self) -> None:
        """Start every worker and wait until each has imported what it needs."""
        await run_in_own_thread(self._start, name="cpu-pool-start")

    def _start(self) -> None:
        # The forkserver and the workers are started from this thread (and pebble's threads, which it starts):
        # they inherit its mask, so a signal to the whole process group does not kill them mid-drain.
        with group_signals_blocked():
            self._start_pool()

    def _start_pool(self) -> None:
        ctx = multiprocessing.get_context(self._settings.start_method)
        if self._settings.start_method == "forkserver":
            ctx.set_forkserver_preload(["app.compute.worker", "numpy"])
        self._pool = pebble.ProcessPool(
            max_workers=self._settings.workers,
            max_tasks=self._settings.max_tasks_per_child,
            initializer=init_worker,
            context=ctx,
        )
        # One ping per worker, all outstanding at once, so every worker has started (and imported numpy) before
        # the gateway reports ready.
        futures = [self._pool.schedule(ping, timeout=60) for _ in range(self._settings.workers)]
        self.worker_pids = sorted({f.result(timeout=120) for f in futures})

    def stats(self) -> PoolStats:
        with self._lock:
            pending = self._pending
        return PoolStats(self.capacity, self._settings.queue_limit, pending, list(self.worker_pids))

    async def run(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:  # noqa: ASYNC109
        """Run ``fn(*args)`` in a worker process.

        Raises OverloadedError when ``workers + queue_limit`` jobs are already admitted, TimeoutError when the
        job overran (its worker was killed and replaced), ResourceClosedError after aclose(); a worker that died
        raises pebble's ProcessExpired.
        """
        with self._lock:
            if self._closed or self._pool is None:
                raise ResourceClosedError("cpu pool is not running")
            if self._pending >= self.capacity + self._settings.queue_limit:
                raise OverloadedError("all CPU workers are busy and the queue is full", retry_after_s=1)
            self._pending += 1
        try:
            future = self._pool.schedule(fn, args=args, timeout=timeout or self._settings.job_timeout_s)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(lambda _: self._release())
        try:
            return await asyncio.wrap_future(future)
        except FutureTimeoutError as exc:
            raise TimeoutError(f"job exceeded {timeout or self._settings.job_timeout_s:.1f} s") from exc

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    async def aclose(self) -> None:
        """Let running jobs finish, then stop and join every worker (none orphaned, none zombie)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        pool = self._pool
        if pool is None:
            return

        def close() -> None:
            pool.close()  # type: ignore[no-untyped-call]
            pool.join()

        await run_in_own_thread(close, name="cpu-pool-close")
