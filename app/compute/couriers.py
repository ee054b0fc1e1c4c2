"""One worker process, seen from the gateway: the process, its pipe, and the *courier* thread that serves it.

The courier starts the process, waits for it to say it is warm, then hands it one job at a time and blocks on the
answer (pipe I/O releases the GIL; large buffers go out of band, see ``wire``). When the pipe reads EOF, the worker
is gone: the courier reaps it and reports its exit code. Every report reaches the pool on the event loop through
``call_soon_threadsafe``; the pool's state is never touched from this thread.

Workers are stopped by closing their pipe (they exit on EOF) or with SIGKILL through a pidfd, so that a pid the
kernel has reused is never hit. They ignore SIGINT and SIGTERM (see ``worker.init_worker``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from typing import Any, Literal, Protocol

from app.compute.stats import ExitReason
from app.worker.main import worker_main
from app.worker.wire import Job, recv_message, send_message

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0

WorkerState = Literal["starting", "idle", "busy", "retiring", "doomed"]


class Carried(Protocol):
    """What a courier needs of a job: its id and what to send."""

    id: int
    job: Job


class WorkerEvents(Protocol):
    """The pool's side. Called on the event-loop thread only."""

    def on_ready(self, worker: WorkerProcess) -> None: ...
    def on_started(self, worker: WorkerProcess, carried: Any) -> None: ...
    def on_reply(self, worker: WorkerProcess, carried: Any, message: tuple[Any, ...], pipe_bytes: int) -> None: ...
    def on_exit(self, worker: WorkerProcess, exitcode: int | None, was_ready: bool) -> None: ...


@dataclass(eq=False)
class WorkerProcess:
    """State is owned by the pool (event loop); ``inbox`` and ``kill()`` are safe from any thread."""

    index: int
    state: WorkerState = "starting"
    pid: int | None = None
    task: Any = None  # the job it runs, while it runs one
    tasks_done: int = 0
    exit_reason: ExitReason | None = None
    inbox: queue.SimpleQueue[Carried | None] = field(default_factory=queue.SimpleQueue)
    _pidfd: int = -1
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, ctx: BaseContext, plugin_refs: list[tuple[str, str]], events: WorkerEvents, loop: Any) -> None:
        """Start the courier thread, which starts the process. Reports arrive through ``events`` on ``loop``."""
        thread = threading.Thread(
            target=self._courier, args=(ctx, plugin_refs, events, loop), name=f"cpu-courier-{self.index}"
        )
        thread.daemon = True  # never keeps the interpreter alive; the pool's exit hook kills what is left
        thread.start()

    def hand(self, carried: Carried) -> None:
        self.inbox.put(carried)

    def retire(self) -> None:
        """Ask an idle worker to exit: its courier closes the pipe and the worker reads EOF."""
        self.inbox.put(None)

    def kill(self) -> None:
        with self._lock:
            try:
                if self._pidfd >= 0:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                elif self.pid is not None:
                    os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _set_process(self, pid: int) -> None:
        with self._lock:
            self.pid = pid
            try:
                self._pidfd = os.pidfd_open(pid)
            except OSError:  # an old kernel: plain kill(), with the tiny pid-reuse window that has
                self._pidfd = -1

    def _forget_process(self) -> None:
        with self._lock:
            if self._pidfd >= 0:
                os.close(self._pidfd)
                self._pidfd = -1

    def _courier(self, ctx: BaseContext, plugin_refs: list[tuple[str, str]], events: WorkerEvents, loop: Any) -> None:
        def post(callback: Any, *args: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone (interpreter exit): nobody to tell
                loop.call_soon_threadsafe(callback, *args)

        conn: Connection | None = None
        process: Any = None
        ready = False
        try:
            conn, child = ctx.Pipe(duplex=True)
            process = ctx.Process(  # type: ignore[attr-defined]
                target=worker_main, args=(child, plugin_refs), name=f"gateway-cpu-{self.index}"
            )
            process.start()
            child.close()  # only the worker holds its end now, so its death reads as EOF here
            self._set_process(process.pid)
            message, _ = recv_message(conn)
            ready = message[0] == "ready"
            post(events.on_ready, self)
            while (carried := self.inbox.get()) is not None:
                sent = send_message(conn, ("job", carried.id, carried.job))
                while True:
                    message, received = recv_message(conn)
                    if message[0] == "started":
                        post(events.on_started, self, carried)
                        continue
                    post(events.on_reply, self, carried, message, sent + received)
                    break
        except (EOFError, OSError):
            pass  # the worker died (or was killed); reported below with its exit code
        except Exception:
            log.exception("CPU courier %d failed", self.index)
        finally:
            exitcode = None
            if conn is not None:
                conn.close()  # a live worker reads EOF and exits
            if process is not None and process.pid is not None:
                process.join(STOP_GRACE_S)
                if process.exitcode is None:
                    self.kill()
                    process.join()
                exitcode = process.exitcode
                process.close()
            self._forget_process()
            post(events.on_exit, self, exitcode, ready)


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "exit status unknown"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"
