"""The worker lifecycle: the CPU pool's worker processes, started, warmed, replaced when they die or overrun, and
retired after ``max_tasks_per_child`` jobs or at shutdown.

A worker's states, all changed on the event loop (the couriers' reports arrive here through
``call_soon_threadsafe``)::

    starting --ready--> idle --hand()--> busy --reply--> idle | retiring (recycled, shutdown)
                                           \\--kill()--> doomed (its job overran, or its caller left)
    any state --the process exits--> gone, and replaced (unless the fleet is closing)

The job lifecycle (app/compute/pool.py) decides which job a worker runs and what becomes of a job whose worker
died; this module only tells it, through ``JobEvents``.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import itertools
import logging
import multiprocessing
import typing
from typing import Any

from app.compute.couriers import STOP_GRACE_S, Carried, WorkerProcess, describe_exit
from app.compute.stats import ExitReason, PoolObserver
from app.concurrency import run_in_own_thread
from app.errors import StartupError
from app.settings import ComputeSettings
from app.worker.signals import group_signals_blocked

log = logging.getLogger("app.compute.pool")

START_TIMEOUT_S = 60.0
RESPAWN_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)


class JobEvents(typing.Protocol):
    """The job lifecycle's side. Called on the event loop only."""

    def job_started(self, carried: Any) -> None: ...
    def job_replied(self, carried: Any, message: tuple[Any, ...], pipe_bytes: int) -> None: ...
    def job_lost(self, carried: Any, exitcode: int | None) -> None: ...
    def workers_changed(self) -> None:
        """A worker became free, or one exited: dispatch waiting jobs, and see whether the pool drained."""


class WorkerFleet:
    """Implements the couriers' ``WorkerEvents``. ``start()`` warms every worker; ``aclose()`` retires them all."""

    def __init__(
        self,
        settings: ComputeSettings,
        jobs: JobEvents,
        *,
        observer: PoolObserver,
        counters: collections.Counter[str],
    ) -> None:
        self._settings = settings
        self._jobs = jobs
        self._observer = observer
        self._counters = counters
        self._plugin_refs: list[tuple[str, str]] = []
        self._ctx: multiprocessing.context.BaseContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: set[WorkerProcess] = set()
        self._idle: collections.deque[WorkerProcess] = collections.deque()
        self._indexes = itertools.count(1)
        self._spawn_failures = 0
        self._ready_during_start: asyncio.Future[None] | None = None
        self._all_exited = asyncio.Event()
        self.closing = False

    @property
    def pids(self) -> list[int]:
        """Pids of the workers that are up (idle or busy)."""
        return sorted(w.pid for w in self._workers if w.pid is not None and w.state in ("idle", "busy"))

    def busy(self) -> list[WorkerProcess]:
        return [w for w in self._workers if w.task is not None]

    async def start(self, plugin_refs: list[tuple[str, str]]) -> None:
        """Start every worker and wait until each is warm.

        Raises StartupError when a worker cannot start, or not within START_TIMEOUT_S."""
        self._loop = asyncio.get_running_loop()
        self._plugin_refs = plugin_refs
        ctx = multiprocessing.get_context(self._settings.start_method)
        if self._settings.start_method == "forkserver":
            # Takes effect when this process starts its fork server (once): workers fork from a warm image.
            modules = ["numpy", "app.worker.main", *{ref.partition(":")[0] for _, ref in plugin_refs}]
            ctx.set_forkserver_preload(modules)
            # Started now, from a thread with SIGINT and SIGTERM blocked: the fork server inherits the mask, so a
            # signal to the whole process group (Ctrl-C, tini -g) cannot kill it mid-drain, and every worker it
            # forks later starts with the same protection.
            await run_in_own_thread(_start_forkserver_shielded, name="forkserver-start")
        self._ctx = ctx
        self._ready_during_start = self._loop.create_future()
        atexit.register(self._kill_all_at_exit)
        for _ in range(self._settings.workers):
            self._spawn()
        try:
            await asyncio.wait_for(asyncio.shield(self._ready_during_start), START_TIMEOUT_S)
        except TimeoutError as exc:
            raise StartupError(f"CPU workers did not start within {START_TIMEOUT_S:.0f} s") from exc
        finally:
            self._ready_during_start = None

    def take_idle(self) -> WorkerProcess | None:
        return self._idle.popleft() if self._idle else None

    def hand(self, worker: WorkerProcess, carried: Carried) -> None:
        worker.state = "busy"
        worker.task = carried
        worker.hand(carried)

    def kill(self, worker: WorkerProcess) -> None:
        """Stop a busy worker now (its job overran, or nobody wants its answer); it is replaced when it is gone."""
        worker.state = "doomed"
        worker.exit_reason = "killed"
        worker.kill()

    async def aclose(self) -> None:
        """Retire every worker and wait until each has exited (killing one stuck before it said ready). Safe on a
        partly started fleet."""
        self.closing = True
        for worker in list(self._workers):
            self._retire(worker, "shutdown")
        if self._workers:
            try:
                await asyncio.wait_for(self._all_exited.wait(), 2 * STOP_GRACE_S)
            except TimeoutError:
                # One still starting (stuck before it could say ready) never reads its retirement: kill it.
                for worker in list(self._workers):
                    worker.kill()
                await self._all_exited.wait()
        atexit.unregister(self._kill_all_at_exit)

    # -- WorkerEvents: reports from the couriers, on the loop --------------------------------------------------

    def on_ready(self, worker: WorkerProcess) -> None:
        if worker.state != "starting":
            return
        self._spawn_failures = 0
        self._counters["workers_started"] += 1
        if self.closing:
            self._retire(worker, "shutdown")
            return
        worker.state = "idle"
        self._idle.append(worker)
        waiter = self._ready_during_start
        if waiter is not None and not waiter.done() and len(self.pids) >= self._settings.workers:
            waiter.set_result(None)
        self._jobs.workers_changed()

    def on_started(self, worker: WorkerProcess, carried: Any) -> None:
        self._jobs.job_started(carried)

    def on_reply(self, worker: WorkerProcess, carried: Any, message: tuple[Any, ...], pipe_bytes: int) -> None:
        if worker.task is carried:
            worker.task = None
        worker.tasks_done += 1
        self._jobs.job_replied(carried, message, pipe_bytes)
        limit = self._settings.max_tasks_per_child
        if worker.state == "doomed":
            pass  # being killed (its job overran just as it answered); replaced when its exit is seen
        elif self.closing:
            self._retire(worker, "shutdown")
        elif limit and worker.tasks_done >= limit:
            self._retire(worker, "recycled")
        else:
            worker.state = "idle"
            self._idle.append(worker)
        self._jobs.workers_changed()

    def on_exit(self, worker: WorkerProcess, exitcode: int | None, was_ready: bool) -> None:
        self._workers.discard(worker)
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        carried, worker.task = worker.task, None
        reason: ExitReason = worker.exit_reason or ("crashed" if was_ready else "start_failed")
        self._observer.worker_exited(worker.pid, reason)
        if reason == "crashed":
            self._counters["workers_crashed"] += 1
            log.warning("CPU worker %s died (%s)", worker.pid, describe_exit(exitcode))
        elif reason == "recycled":
            self._counters["workers_recycled"] += 1
        if carried is not None:
            self._jobs.job_lost(carried, exitcode)
        waiter = self._ready_during_start
        if reason == "start_failed" and waiter is not None and not waiter.done():
            # During start(): fail it rather than retry forever; the lifespan then closes what was opened.
            self._counters["worker_start_failures"] += 1
            waiter.set_exception(StartupError(f"a CPU worker failed to start ({describe_exit(exitcode)})"))
        elif not self.closing:
            self._schedule_respawn(reason)
        if not self._workers:
            self._all_exited.set()
        self._jobs.workers_changed()

    # -- starting and stopping ---------------------------------------------------------------------------------

    def _spawn(self) -> None:
        assert self._ctx is not None
        assert self._loop is not None
        worker = WorkerProcess(next(self._indexes))
        self._workers.add(worker)
        self._all_exited.clear()
        worker.start(self._ctx, self._plugin_refs, self, self._loop)

    def _retire(self, worker: WorkerProcess, reason: ExitReason) -> None:
        if worker.task is not None:
            worker.state = "doomed"
            worker.exit_reason = reason
            worker.kill()
            return
        worker.state = "retiring"
        worker.exit_reason = worker.exit_reason or reason
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        worker.retire()

    def _schedule_respawn(self, reason: ExitReason) -> None:
        assert self._loop is not None
        if reason == "start_failed":
            delay = RESPAWN_BACKOFF_S[min(self._spawn_failures, len(RESPAWN_BACKOFF_S) - 1)]
            self._spawn_failures += 1
            log.error("a CPU worker failed to start; retrying in %.1f s", delay)
            self._loop.call_later(delay, self._respawn)
        else:
            self._counters["workers_replaced"] += 1
            self._spawn()

    def _respawn(self) -> None:
        if not self.closing:
            self._spawn()

    def _kill_all_at_exit(self) -> None:
        # The interpreter is exiting without aclose(): workers ignore SIGTERM, and multiprocessing would join them
        # forever at exit. Registered at start(), so it runs before multiprocessing's own exit handler.
        for worker in list(self._workers):
            worker.kill()


def _start_forkserver_shielded() -> None:
    import multiprocessing.forkserver

    with group_signals_blocked():
        multiprocessing.forkserver.ensure_running()
