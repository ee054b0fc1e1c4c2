"""The CPU process pool: worker processes fed from the event loop, with bounded admission, per-job timeouts that
kill and replace the worker, crash recovery, and worker recycling.

Why not ``ProcessPoolExecutor``, or pebble: a running future cannot be cancelled, one dead worker breaks the whole
executor (``BrokenProcessPool`` for every job in flight), and pebble, which can kill, stops a worker with SIGTERM and
waits 3 s before SIGKILL (workers ignore SIGTERM here), and puts its pool into an error state when an idle worker
dies. This pool owns each worker individually:

- every worker has its own duplex pipe and a *courier* thread in the gateway that starts the process, sends it one
  job at a time and blocks on its answer (pipe I/O releases the GIL; big buffers go out of band, see ``wire``);
- all pool state lives on the event loop; couriers report through ``call_soon_threadsafe``;
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
import atexit
import collections
import contextlib
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Literal, Protocol

from app.compute import shm
from app.compute.registry import Registry, TransformDefinitionError, discover_plugins, load_registry
from app.compute.wire import Answer, Job, ShmArray, recv_message, send_message
from app.compute.worker import worker_main
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

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0
RESPAWN_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)

Transport = Literal["shm", "pickle"]
Outcome = Literal["ok", "error", "timeout", "crashed", "cancelled", "queue_timeout"]
ExitReason = Literal["recycled", "crashed", "killed", "shutdown", "start_failed"]


@dataclass(frozen=True)
class JobRecord:
    """What one job did: which transport carried its input and its answer, and the bytes each moved."""

    transform: str
    outcome: Outcome
    input_transport: Transport
    output_transport: Transport | None
    shm_bytes: int  # array bytes that went through segments (input and answer)
    pickle_bytes: int  # bytes written to and read from the worker's pipe (pickles and their out-of-band frames)
    queue_wait_s: float
    run_s: float  # from dispatch to answer, as the gateway saw it
    cpu_s: float  # CPU time the worker process spent on the transform and its encoding
    worker_pid: int | None


class PoolObserver(Protocol):
    """Metrics hook. Called on the event-loop thread: implementations must be quick and must not block."""

    def job_rejected(self, transform: str) -> None: ...
    def job_started(self, transform: str, queue_wait_s: float) -> None: ...
    def job_finished(self, record: JobRecord) -> None: ...
    def worker_exited(self, pid: int | None, reason: ExitReason) -> None: ...


@dataclass(frozen=True)
class PoolStats:
    workers: int
    alive: int
    busy: int
    waiting: int
    admitted: int
    capacity: int
    worker_pids: tuple[int, ...]
    busy_pids: tuple[int, ...]
    counters: dict[str, int]


@dataclass(frozen=True)
class Completed:
    answer: Answer
    record: JobRecord


class Admission:
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

    def __enter__(self) -> Admission:
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
    worker: _Worker | None = None
    started: bool = False
    attempts: int = 0
    timed_out: bool = False
    abandoned: bool = False
    pickle_bytes: int = 0
    queue_timer: asyncio.TimerHandle | None = None
    run_timer: asyncio.TimerHandle | None = None
    record: JobRecord | None = None


@dataclass(eq=False)
class _Worker:
    index: int
    inbox: queue.SimpleQueue[_Task | None] = field(default_factory=queue.SimpleQueue)
    state: Literal["starting", "idle", "busy", "retiring", "doomed"] = "starting"
    pid: int | None = None
    task: _Task | None = None
    tasks_done: int = 0
    exit_reason: ExitReason | None = None
    _pidfd: int = -1
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def set_process(self, pid: int) -> None:
        with self._lock:
            self.pid = pid
            try:
                self._pidfd = os.pidfd_open(pid)
            except OSError:  # older kernels: plain kill(), with the (tiny) pid-reuse window it has
                self._pidfd = -1

    def kill(self) -> None:
        with self._lock:
            try:
                if self._pidfd >= 0:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                elif self.pid is not None:
                    os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def forget_process(self) -> None:
        with self._lock:
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1


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
        self.observer = observer
        self._extra_transforms = list(extra_transforms)
        self.namer = shm.SegmentNamer(settings.shm_prefix)
        self.shm_enabled = False
        self._registry: Registry | None = None
        self._ctx: multiprocessing.context.BaseContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: set[_Worker] = set()
        self._idle: collections.deque[_Worker] = collections.deque()
        self._waiting: collections.deque[_Task] = collections.deque()
        self._admitted = 0
        self._ids = itertools.count(1)
        self._indexes = itertools.count(1)
        self._closing = False
        self._closed = False
        self._spawn_failures = 0
        self._ready_during_start: asyncio.Future[None] | None = None
        self._all_exited = asyncio.Event()
        self._drained = asyncio.Event()
        self._counters: collections.Counter[str] = collections.Counter()

    # -- public surface ----------------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._settings.workers + self._settings.queue_limit

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            raise ResourceClosedError("the CPU pool has not started")
        return self._registry

    @property
    def worker_pids(self) -> list[int]:
        return sorted(w.pid for w in self._workers if w.pid is not None and w.state in ("idle", "busy"))

    async def start(self) -> None:
        """Load the registry, remove stale segments, start every worker and wait until each is warm.

        Raises StartupError when a transform cannot be loaded or a worker cannot start.
        """
        self._loop = asyncio.get_running_loop()
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
        ctx = multiprocessing.get_context(self._settings.start_method)
        if self._settings.start_method == "forkserver":
            # Takes effect when this process starts its fork server (once): workers fork from a warm image.
            modules = ["numpy", "app.compute.worker", *{ref.partition(":")[0] for _, ref in refs}]
            ctx.set_forkserver_preload(modules)
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
        log.info("CPU pool ready", extra={"event": "cpu_pool_ready", "workers": self.worker_pids})

    def admit(self, transform: str) -> Admission:
        """Take a place for one job, or refuse at once.

        Raises OverloadedError when ``workers + queue_limit`` jobs are already admitted, ResourceClosedError while
        the pool closes.
        """
        if self._closing or self._registry is None:
            raise ResourceClosedError("the CPU pool is not accepting jobs")
        if self._admitted >= self.capacity:
            self._counters["rejected"] += 1
            self._notify("job_rejected", transform)
            raise OverloadedError("every CPU worker is busy and the queue is full", retry_after_s=1)
        self._admitted += 1
        self._drained.clear()
        return Admission(self, transform)

    async def run(self, job: Job, admission: Admission) -> Completed:
        """Run one job in a worker and return its answer and record.

        Raises TransformTimeoutError (504), WorkerCrashedError (503), WorkerUnavailableError (503: no worker
        became free within ``queue_timeout_s``), InvalidInputError (422: the transform refused the values),
        TransformFailedError (500), ResourceClosedError after close. Cancelling the caller drops a queued job, or
        kills the worker of a running one.
        """
        if self._closed or self._loop is None:
            raise ResourceClosedError("the CPU pool is closed")
        task = _Task(next(self._ids), job, self._loop.create_future(), queued_at=admission.admitted_at)
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

    def stats(self) -> PoolStats:
        busy = self._busy()
        return PoolStats(
            workers=self._settings.workers,
            alive=sum(1 for w in self._workers if w.state in ("idle", "busy")),
            busy=len(busy),
            waiting=len(self._waiting),
            admitted=self._admitted,
            capacity=self.capacity,
            worker_pids=tuple(self.worker_pids),
            busy_pids=tuple(sorted(w.pid for w in busy if w.pid is not None)),
            counters=dict(self._counters),
        )

    async def aclose(self) -> None:
        """Refuse new jobs, let admitted ones finish (each bounded by its timeouts), then stop every worker and
        unlink any segment of this process still in /dev/shm. Safe on a partly started pool, and idempotent."""
        if self._closed:
            return
        self._closing = True
        if self._admitted or self._waiting or self._busy():
            bound = self._settings.queue_timeout_s + self._settings.job_timeout_s + STOP_GRACE_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), bound)
        self._closed = True
        for task in list(self._waiting):
            self._finish(task, "cancelled", exc=ResourceClosedError("the CPU pool closed"))
        self._waiting.clear()
        for worker in list(self._workers):
            self._retire(worker, "shutdown")
        if self._workers:
            await self._all_exited.wait()
        for name in self.namer.mine():
            log.warning("unlinking leftover shared-memory segment %s", name)
            with contextlib.suppress(OSError):
                (shm.SHM_DIR / name).unlink()
        atexit.unregister(self._kill_all_at_exit)

    # -- workers -----------------------------------------------------------------------------------------------

    def _spawn(self) -> None:
        worker = _Worker(next(self._indexes))
        self._workers.add(worker)
        self._all_exited.clear()
        thread = threading.Thread(target=self._courier, args=(worker,), name=f"cpu-courier-{worker.index}")
        thread.daemon = True  # never keeps the interpreter alive; the atexit hook kills what is left
        thread.start()

    def _courier(self, worker: _Worker) -> None:
        """Runs in the worker's courier thread: starts the process, ferries its jobs, reaps it."""
        assert self._ctx is not None
        assert self._registry is not None
        conn: Connection | None = None
        process: Any = None
        ready = False
        try:
            conn, child = self._ctx.Pipe(duplex=True)
            process = self._ctx.Process(  # type: ignore[attr-defined]
                target=worker_main, args=(child, self._registry.plugin_refs), name=f"gateway-cpu-{worker.index}"
            )
            process.start()
            child.close()  # only the worker holds its end now, so its death reads as EOF here
            worker.set_process(process.pid)
            message, _ = recv_message(conn)
            ready = message[0] == "ready"
            self._post(self._on_ready, worker)
            while (task := worker.inbox.get()) is not None:
                sent = send_message(conn, ("job", task.id, task.job))
                while True:
                    message, received = recv_message(conn)
                    if message[0] == "started":
                        self._post(self._on_started, task)
                        continue
                    self._post(self._on_reply, worker, task, message, sent + received)
                    break
        except (EOFError, OSError):
            pass  # the worker died (or was killed); reported below with its exit code
        except Exception:
            log.exception("CPU courier %d failed", worker.index)
        finally:
            exitcode = None
            if conn is not None:
                conn.close()  # a live worker reads EOF and exits
            if process is not None and process.pid is not None:
                process.join(STOP_GRACE_S)
                if process.exitcode is None:
                    worker.kill()
                    process.join()
                exitcode = process.exitcode
                process.close()
            worker.forget_process()
            self._post(self._on_exit, worker, exitcode, ready)

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is gone (interpreter exit): nobody to tell
            self._loop.call_soon_threadsafe(callback, *args)

    def _on_ready(self, worker: _Worker) -> None:
        if worker.state != "starting":
            return
        self._spawn_failures = 0
        self._counters["workers_started"] += 1
        if self._closing:
            self._retire(worker, "shutdown")
            return
        worker.state = "idle"
        self._idle.append(worker)
        waiter = self._ready_during_start
        if waiter is not None and not waiter.done() and len(self.worker_pids) >= self._settings.workers:
            waiter.set_result(None)
        self._dispatch()

    def _retire(self, worker: _Worker, reason: ExitReason) -> None:
        if worker.task is not None:
            worker.state = "doomed"
            worker.exit_reason = reason
            worker.kill()
            return
        worker.state = "retiring"
        worker.exit_reason = worker.exit_reason or reason
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        worker.inbox.put(None)

    def _on_exit(self, worker: _Worker, exitcode: int | None, was_ready: bool) -> None:
        self._workers.discard(worker)
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)
        task, worker.task = worker.task, None
        reason: ExitReason = worker.exit_reason or ("crashed" if was_ready else "start_failed")
        self._notify("worker_exited", worker.pid, reason)
        if reason == "crashed":
            self._counters["workers_crashed"] += 1
            log.warning("CPU worker %s died (%s)", worker.pid, _describe_exit(exitcode))
        elif reason == "recycled":
            self._counters["workers_recycled"] += 1
        if task is not None:
            self._task_lost(task, exitcode)
        waiter = self._ready_during_start
        if reason == "start_failed" and waiter is not None and not waiter.done():
            # During start(): fail it rather than retry forever; the lifespan then closes what was opened.
            self._counters["worker_start_failures"] += 1
            waiter.set_exception(StartupError(f"a CPU worker failed to start ({_describe_exit(exitcode)})"))
        elif not self._closing:
            self._schedule_respawn(reason)
        if not self._workers:
            self._all_exited.set()
        self._dispatch()
        self._check_drained()

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
        if not self._closing:
            self._spawn()

    # -- jobs --------------------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        assert self._loop is not None
        while self._idle and self._waiting:
            worker = self._idle.popleft()
            task = self._waiting.popleft()
            if task.queue_timer is not None:
                task.queue_timer.cancel()
            worker.state = "busy"
            worker.task = task
            task.worker = worker
            task.dispatched_at = time.perf_counter()
            task.run_timer = self._loop.call_later(self._settings.job_timeout_s, self._on_job_timeout, task)
            worker.inbox.put(task)
            self._notify("job_started", task.job.transform, task.dispatched_at - task.queued_at)

    def _on_started(self, task: _Task) -> None:
        task.started = True

    def _on_reply(self, worker: _Worker, task: _Task, message: tuple[Any, ...], pipe_bytes: int) -> None:
        task.pickle_bytes += pipe_bytes
        if worker.task is task:
            worker.task = None
        worker.tasks_done += 1
        kind = message[0]
        if kind == "done":
            self._finish(task, "ok", answer=message[2])
        else:
            _, _, error_kind, detail = message
            exc: Exception = InvalidInputError(detail) if error_kind == "input" else TransformFailedError(f"{detail}")
            if error_kind != "input":
                log.error("transform %s failed: %s", task.job.transform, detail)
            self._finish(task, "error", exc=exc)
        limit = self._settings.max_tasks_per_child
        if worker.state == "doomed":
            pass  # being killed (its job overran just as it answered); replaced when its exit is seen
        elif self._closing:
            self._retire(worker, "shutdown")
        elif limit and worker.tasks_done >= limit:
            self._retire(worker, "recycled")
        else:
            worker.state = "idle"
            self._idle.append(worker)
        self._dispatch()
        self._check_drained()

    def _on_job_timeout(self, task: _Task) -> None:
        worker = task.worker
        if worker is None or worker.task is not task:
            return
        task.timed_out = True
        worker.state = "doomed"
        worker.exit_reason = "killed"
        worker.kill()

    def _on_queue_timeout(self, task: _Task) -> None:
        if task in self._waiting:
            self._waiting.remove(task)
            self._finish(
                task,
                "queue_timeout",
                exc=WorkerUnavailableError(f"no CPU worker became free within {self._settings.queue_timeout_s:g} s"),
            )
            self._check_drained()

    def _task_lost(self, task: _Task, exitcode: int | None) -> None:
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
        elif not task.started and task.attempts == 0 and not self._closed:
            # It never ran, so it cannot be what killed the worker: one more try on another worker.
            task.attempts += 1
            task.worker = None
            self._counters["retried"] += 1
            if task.run_timer is not None:
                task.run_timer.cancel()
            self._waiting.appendleft(task)
        else:
            self._finish(
                task,
                "crashed",
                exc=WorkerCrashedError(f"the worker running the job died ({_describe_exit(exitcode)}); retry later"),
            )

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
            worker.state = "doomed"
            worker.exit_reason = "killed"
            worker.kill()

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
        self._count(record, answer)
        self._notify("job_finished", record)
        if not task.future.done():
            if exc is not None:
                task.future.set_exception(exc)
            elif answer is not None:
                task.future.set_result(answer)
            else:
                task.future.cancel()

    def _count(self, record: JobRecord, answer: Answer | None) -> None:
        c = self._counters
        c[f"jobs_{record.outcome}"] += 1
        if record.run_s or record.pickle_bytes:
            c[f"{record.input_transport}_inputs"] += 1
        if record.output_transport is not None:
            c[f"{record.output_transport}_outputs"] += 1
        c["shm_bytes"] += record.shm_bytes
        c["pickle_bytes"] += record.pickle_bytes
        if answer is not None and answer.shm_fallback:
            c["shm_fallbacks"] += 1
            log.warning("/dev/shm could not hold a %d-byte answer; it came through the pipe", answer.length)

    def count_input_fallback(self) -> None:
        """The gateway could not back an input segment (/dev/shm full) and sent the array inline instead."""
        self._counters["shm_fallbacks"] += 1

    def _released(self) -> None:
        self._admitted -= 1
        self._check_drained()

    def _check_drained(self) -> None:
        if not self._admitted and not self._waiting and not self._busy():
            self._drained.set()

    def _busy(self) -> list[_Worker]:
        return [w for w in self._workers if w.task is not None]

    def _notify(self, method: str, *args: Any) -> None:
        if self.observer is None:
            return
        try:
            getattr(self.observer, method)(*args)
        except Exception:
            log.exception("CPU pool observer failed in %s", method)

    def _kill_all_at_exit(self) -> None:
        # The interpreter is exiting without aclose(): workers ignore SIGTERM, and multiprocessing would join them
        # forever at exit. Registered at start(), so it runs before multiprocessing's own exit handler.
        for worker in list(self._workers):
            worker.kill()


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"
