"""What the CPU pool reports: a record per job, counters, and the observer hook metrics plug into.

Counters are plain (``PoolStats.counters``): ``jobs_<outcome>``, ``shm_inputs``/``pickle_inputs``,
``shm_outputs``/``pickle_outputs``, ``shm_bytes``, ``pickle_bytes``, ``shm_fallbacks``, ``rejected``, ``retried``,
``workers_started``/``_recycled``/``_replaced``/``_crashed``, ``worker_start_failures``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from app.compute.workers import ExitReason

Transport = Literal["shm", "pickle"]
Outcome = Literal["ok", "error", "timeout", "crashed", "cancelled", "queue_timeout"]


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
