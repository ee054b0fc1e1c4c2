"""The CPU process pool: worker processes fed from the event loop, with bounded admission, per-job timeouts that
kill and replace the worker, crash recovery, and worker recycling.

Why not ``ProcessPoolExecutor``, or pebble: a running future cannot be cancelled, one dead worker breaks the whole
executor (``BrokenProcessPool`` for every job in flight), and pebble, which can kill, stops a worker with SIGTERM and
waits 3 s before SIGKILL (workers ignore SIGTERM here), and puts its pool into an error state when an idle worker
dies. This pool owns each worker individually:

- every worker has its own pipe and a courier thread in the gateway (``couriers``); all pool state lives on the
  event loop, where the couriers' reports arrive. The workers' lifecycle is ``fleet``'s; this module runs the
  jobs' (admitted, queued, dispatched, finished);
- a job past ``job_timeout_s`` gets its worker SIGKILLed (through a pidfd, so a recycled pid is never hit) and
  answers 504; a worker that dies by itself fails its running job with 503, and a job it had not yet started is
  retried once on another worker. Either way a fresh worker replaces it; nothing else is affected;
- a worker is retired after ``max_tasks_per_child`` jobs and replaced: the pool's own recycling, so CPython's
  ``max_tasks_per_child`` (and the hang some 3.11 releases have with it) is never involved;
- at most ``workers + queue_limit`` jobs are admitted; beyond that ``admit()`` refuses at once (503 +
  Retry-After). A job waiting for a worker longer than ``queue_timeout_s`` fails with 503; one whose caller is
  cancelled (client gone) leaves the queue at once, or, if running, has its worker killed and replaced.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from app.compute.couriers import STOP_GRACE_S, WorkerProcess, describe_exit
from app.compute.fleet import WorkerFleet
from app.compute.reaper import Closable, Reaper
from app.compute.stats import JobRecord, Observers, Outcome, PoolObserver, PoolStats, Transport
from app.errors import (
    InvalidInputError,
    OverloadedError,
    ResourceClosedError,
    StartupError,
    TransformFailedError,
    TransformTimeoutError,
    WorkerCrashedError,
    WorkerUnavailableError,
)
from app.settings import ComputeSettings
from app.worker import shm
from app.worker.registry import Registry, discover_plugins, load_registry
from app.worker.spec import TransformDefinitionError
from app.worker.wire import Answer, Job, ShmArray

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completed:
    answer: Answer
    record: JobRecord


class JobSlot:
    """A place among the jobs the pool admitted. Give it back with ``release()`` or by leaving ``with``."""

    def __init__(self, pool: CpuPool, transform: str) -> None:
        self._pool = pool
        self.transform = transform
        self.admitted_at = time.perf_counter()
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._released()

    def __enter__(self) -> JobSlot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(eq=False)
class _Task:
    id: int
    job: Job
    future: asyncio.Future[Answer]
    queued_at: float
    dispatched_at: float = 0.0
    worker: WorkerProcess | None = None
    started: bool = False
    attempts: int = 0
    timed_out: bool = False
    abandoned: bool = False
    pickle_bytes: int = 0
    queue_timer: asyncio.TimerHandle | None = None
    run_timer: asyncio.TimerHandle | None = None
    record: JobRecord | None = None


class CpuPool:
    """Transforms run here. ``start()`` warms every worker; ``aclose()`` lets admitted jobs finish, then stops the
    workers and removes any shared-memory segment this process still owns."""

    def __init__(
        self,
        settings: ComputeSettings,
        *,
        observer: PoolObserver | None = None,
        extra_transforms: Sequence[tuple[str, str]] = (),
    ) -> None:
        """``extra_transforms``: ``(name, "module:attr")`` pairs loaded besides the built-ins and entry points."""
        self._settings = settings
        self._observer = Observers() if observer is None else Observers(observer)
        self._extra_transforms = list(extra_transforms)
        self.namer = shm.SegmentNamer(settings.shm_prefix)
        self.shm_enabled = False
        self._registry: Registry | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._counters: collections.Counter[str] = collections.Counter()
        self._fleet = WorkerFleet(settings, self, observer=self._observer, counters=self._counters)
        self._waiting: collections.deque[_Task] = collections.deque()
        self._admitted = 0
        self._ids = itertools.count(1)
        self._closing = False
        self._closed = False
        self._drained = asyncio.Event()
        self._reaper = Reaper()

    # -- public surface ----------------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._settings.workers + self._settings.queue_limit

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            raise ResourceClosedError("the CPU pool has not started")
        return self._registry

    def observe(self, observer: PoolObserver) -> None:
        """Report to ``observer`` too, from now on (on the event loop; it must be quick and must not block)."""
        self._observer.add(observer)

    @property
    def worker_pids(self) -> list[int]:
        return self._fleet.pids

    async def start(self) -> None:
        """Load the registry, remove stale segments, start every worker and wait until each is warm.

        Raises StartupError when a transform cannot be loaded or a worker cannot start.
        """
        self._loop = asyncio.get_running_loop()
        self._reaper.start()
        self.shm_enabled = shm.available()
        if self.shm_enabled:
            removed = shm.sweep_stale(self._settings.shm_prefix)
            if removed:
                log.warning("removed %d shared-memory segment(s) left by a dead instance", len(removed))
        else:
            log.warning("no usable /dev/shm: every array goes through the worker pipes")
        try:
            refs = (discover_plugins() if self._settings.load_plugins else []) + self._extra_transforms
            self._registry = load_registry(refs)
        except TransformDefinitionError as exc:
            raise StartupError(str(exc)) from exc
        await self._fleet.start(self._registry.plugin_refs)
        log.info("CPU pool ready", extra={"event": "cpu_pool_ready", "workers": self.worker_pids})

    def admit(self, transform: str) -> JobSlot:
        """Take a place for one job, or refuse at once.

        Raises OverloadedError when ``workers + queue_limit`` jobs are already admitted, ResourceClosedError while
        the pool closes.
        """
        if self._closing or self._registry is None:
            raise ResourceClosedError("the CPU pool is not accepting jobs")
        if self._admitted >= self.capacity:
            self._counters["rejected"] += 1
            self._observer.job_rejected(transform)
            raise OverloadedError("every CPU worker is busy and the queue is full", retry_after_s=1)
        self._admitted += 1
        self._drained.clear()
        return JobSlot(self, transform)

    async def run(self, job: Job, slot: JobSlot) -> Completed:
        """Run one job in a worker and return its answer and record.

        Raises TransformTimeoutError (504), WorkerCrashedError (503), WorkerUnavailableError (503: no worker
        became free within ``queue_timeout_s``), InvalidInputError (422: the transform refused the values),
        TransformFailedError (500), ResourceClosedError after close. Cancelling the caller drops a queued job, or
        kills the worker of a running one.
        """
        if self._closed or self._loop is None:
            raise ResourceClosedError("the CPU pool is closed")
        task = _Task(next(self._ids), job, self._loop.create_future(), queued_at=slot.admitted_at)
        self._waiting.append(task)
        task.queue_timer = self._loop.call_later(self._settings.queue_timeout_s, self._on_queue_timeout, task)
        self._dispatch()
        try:
            answer = await task.future
        except asyncio.CancelledError:
            self._abandon(task)
            raise
        assert task.record is not None
        return Completed(answer, task.record)

    def shm_bytes_held(self) -> int:
        """Bytes of the shared-memory segments this process holds now."""
        total = 0
        for name in self.namer.mine():
            with contextlib.suppress(OSError):
                total += (shm.SHM_DIR / name).stat().st_size
        return total

    def stats(self) -> PoolStats:
        busy = self._fleet.busy()
        return PoolStats(
            workers=self._settings.workers,
            alive=len(self._fleet.pids),
            busy=len(busy),
            waiting=len(self._waiting),
            admitted=self._admitted,
            capacity=self.capacity,
            worker_pids=tuple(self.worker_pids),
            busy_pids=tuple(sorted(w.pid for w in busy if w.pid is not None)),
            running_pids=tuple(sorted(w.pid for w in busy if w.pid is not None and w.task.started)),
            counters=dict(self._counters),
        )

    def dispose(self, *, close: Iterable[Closable] = (), drop: Iterable[object] = ()) -> None:
        """Release large buffers (segments already unlinked, request bodies) off the event loop."""
        self._reaper.dispose(close=close, drop=drop)

    def count_input_fallback(self) -> None:
        """The gateway could not back an input segment (/dev/shm full) and sent the array inline instead."""
        self._counters["shm_fallbacks"] += 1

    async def aclose(self) -> None:
        """Refuse new jobs, let admitted ones finish (each bounded by its timeouts), then stop every worker and
        unlink any segment of this process still in /dev/shm. Safe on a partly started pool, and idempotent."""
        if self._closed:
            return
        self._closing = self._fleet.closing = True
        if self._admitted or self._waiting or self._fleet.busy():
            bound = self._settings.queue_timeout_s + self._settings.job_timeout_s + STOP_GRACE_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), bound)
        self._closed = True
        for task in list(self._waiting):
            self._finish(task, "cancelled", exc=ResourceClosedError("the CPU pool closed"))
        self._waiting.clear()
        await self._fleet.aclose()
        await self._reaper.aclose()
        for name in self.namer.mine():
            log.warning("unlinking leftover shared-memory segment %s", name)
            with contextlib.suppress(OSError):
                (shm.SHM_DIR / name).unlink()

    # -- JobEvents: what the fleet reports, on the loop --------------------------------------------------------

    def workers_changed(self) -> None:
        self._dispatch()
        self._check_drained()

    def job_started(self, task: _Task) -> None:
        task.started = True

    def job_replied(self, task: _Task, message: tuple[Any, ...], pipe_bytes: int) -> None:
        task.pickle_bytes += pipe_bytes
        if message[0] == "done":
            self._finish(task, "ok", answer=message[2])
            return
        _, _, error_kind, detail = message
        exc: Exception = InvalidInputError(detail) if error_kind == "input" else TransformFailedError(f"{detail}")
        if error_kind != "input":
            log.error("transform %s failed: %s", task.job.transform, detail)
        self._finish(task, "error", exc=exc)

    def job_lost(self, task: _Task, exitcode: int | None) -> None:
        """The worker holding ``task`` is gone."""
        if self._closed:
            self._finish(task, "cancelled", exc=ResourceClosedError("the CPU pool closed before the job finished"))
        elif task.timed_out:
            self._finish(
                task,
                "timeout",
                exc=TransformTimeoutError(
                    f"the job exceeded {self._settings.job_timeout_s:g} s; its worker was stopped and replaced"
                ),
            )
        elif task.abandoned:
            self._finish(task, "cancelled")
        elif not task.started and task.attempts == 0:
            # It never ran, so it cannot be what killed the worker: one more try on another worker.
            assert self._loop is not None
            task.attempts += 1
            task.worker = None
            task.dispatched_at = 0.0
            self._counters["retried"] += 1
            if task.run_timer is not None:
                task.run_timer.cancel()
            self._waiting.appendleft(task)
            task.queue_timer = self._loop.call_later(self._settings.queue_timeout_s, self._on_queue_timeout, task)
        else:
            self._finish(
                task,
                "crashed",
                exc=WorkerCrashedError(f"the worker running the job died ({describe_exit(exitcode)}); retry later"),
            )

    # -- jobs --------------------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        assert self._loop is not None
        while self._waiting and (worker := self._fleet.take_idle()) is not None:
            task = self._waiting.popleft()
            if task.queue_timer is not None:
                task.queue_timer.cancel()
            task.worker = worker
            task.dispatched_at = time.perf_counter()
            task.run_timer = self._loop.call_later(self._settings.job_timeout_s, self._on_job_timeout, task)
            self._fleet.hand(worker, task)
            self._observer.job_started(task.job.transform, task.dispatched_at - task.queued_at)

    def _on_job_timeout(self, task: _Task) -> None:
        worker = task.worker
        if worker is None or worker.task is not task:
            return
        task.timed_out = True
        self._fleet.kill(worker)

    def _on_queue_timeout(self, task: _Task) -> None:
        if task in self._waiting:
            self._waiting.remove(task)
            self._finish(
                task,
                "queue_timeout",
                exc=WorkerUnavailableError(f"no CPU worker became free within {self._settings.queue_timeout_s:g} s"),
            )
            self._check_drained()

    def _abandon(self, task: _Task) -> None:
        """The caller went away (cancelled): free its place in the queue, or stop the work it no longer wants."""
        if task.future.done() and task.record is not None:
            return
        task.abandoned = True
        if task in self._waiting:
            self._waiting.remove(task)
            self._finish(task, "cancelled")
            self._check_drained()
            return
        worker = task.worker
        if worker is not None and worker.task is task and worker.state == "busy":
            self._fleet.kill(worker)

    def _finish(
        self, task: _Task, outcome: Outcome, *, answer: Answer | None = None, exc: Exception | None = None
    ) -> None:
        if task.record is not None:
            return
        for timer in (task.queue_timer, task.run_timer):
            if timer is not None:
                timer.cancel()
        now = time.perf_counter()
        sent = task.dispatched_at > 0
        input_transport: Transport = "shm" if isinstance(task.job.input, ShmArray) else "pickle"
        output_transport: Transport | None = None
        shm_bytes = task.job.input.nbytes if sent and isinstance(task.job.input, ShmArray) else 0
        if answer is not None:
            output_transport = "pickle" if answer.inline is not None else "shm"
            if output_transport == "shm":
                shm_bytes += answer.length
        record = JobRecord(
            transform=task.job.transform,
            outcome=outcome,
            input_transport=input_transport,
            output_transport=output_transport,
            shm_bytes=shm_bytes,
            pickle_bytes=task.pickle_bytes,
            queue_wait_s=(task.dispatched_at or now) - task.queued_at,
            run_s=now - task.dispatched_at if sent else 0.0,
            cpu_s=answer.cpu_s if answer is not None else 0.0,
            worker_pid=task.worker.pid if task.worker is not None else None,
        )
        task.record = record
        self._count(record, answer, sent)
        self._observer.job_finished(record)
        if not task.future.done():
            if exc is not None:
                task.future.set_exception(exc)
            elif answer is not None:
                task.future.set_result(answer)
            else:
                task.future.cancel()

    def _count(self, record: JobRecord, answer: Answer | None, sent: bool) -> None:
        c = self._counters
        c[f"jobs_{record.outcome}"] += 1
        if sent:
            c[f"{record.input_transport}_inputs"] += 1
        if record.output_transport is not None:
            c[f"{record.output_transport}_outputs"] += 1
        c["shm_bytes"] += record.shm_bytes
        c["pickle_bytes"] += record.pickle_bytes
        if answer is not None and answer.shm_fallback:
            c["shm_fallbacks"] += 1
            log.warning("/dev/shm could not hold a %d-byte answer; it came through the pipe", answer.length)

    def _released(self) -> None:
        self._admitted -= 1
        self._check_drained()

    def _check_drained(self) -> None:
        if not self._admitted and not self._waiting and not self._fleet.busy():
            self._drained.set()
