"""What the CPU pool reports: a record per job, counters, and the observer hook metrics plug into.

Counters are plain (``PoolStats.counters``): ``jobs_<outcome>``, ``shm_inputs``/``pickle_inputs``,
``shm_outputs``/``pickle_outputs``, ``shm_bytes``, ``pickle_bytes``, ``shm_fallbacks``, ``rejected``, ``retried``,
``workers_started``/``_recycled``/``_replaced``/``_crashed``, ``worker_start_failures``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

log = logging.getLogger("app.compute.pool")

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
    busy_pids: tuple[int, ...]  # handed a job
    running_pids: tuple[int, ...]  # whose job has said it started (a job killed before that is retried)
    counters: dict[str, int]


class Observers:
    """Every observer the pool reports to, each kept from breaking the pool: an exception in a metrics hook is
    logged, never propagated into the pool's bookkeeping (the hooks run inside the couriers' reports)."""

    def __init__(self, *observers: PoolObserver) -> None:
        self._observers = list(observers)

    def add(self, observer: PoolObserver) -> None:
        self._observers.append(observer)

    def job_rejected(self, transform: str) -> None:
        for observer in self._observers:
            with _logged("job_rejected"):
                observer.job_rejected(transform)

    def job_started(self, transform: str, queue_wait_s: float) -> None:
        for observer in self._observers:
            with _logged("job_started"):
                observer.job_started(transform, queue_wait_s)

    def job_finished(self, record: JobRecord) -> None:
        for observer in self._observers:
            with _logged("job_finished"):
                observer.job_finished(record)

    def worker_exited(self, pid: int | None, reason: ExitReason) -> None:
        for observer in self._observers:
            with _logged("worker_exited"):
                observer.worker_exited(pid, reason)


@contextlib.contextmanager
def _logged(hook: str) -> Iterator[None]:
    try:
        yield
    except Exception:
        log.exception("CPU pool observer failed in %s", hook)
