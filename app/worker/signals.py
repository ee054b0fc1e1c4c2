"""Worker processes and the signals meant for the gateway (both sides of the fork).

Ctrl-C and ``tini -g`` signal the whole process group. The gateway's helper processes must not die of a signal
that starts a drain: the forkserver dying makes every worker look dead to the pool (its exit status arrives through
the forkserver), and a worker dying drops the CPU job the gateway is still waiting for. Two measures:

- ``group_signals_blocked()`` in the gateway thread that starts the CPU pool: the processes started from it
  (forkserver, worker processes under "spawn") inherit the blocked mask, so SIGINT and SIGTERM stay pending there
  for ever. The standard library starts its resource tracker the same way.
- ``leave_parent_process_group()`` as the first step of each worker: a process group of its own, so no group
  signal reaches it; then the signals are unblocked again (the worker ignores them: ``app.worker.main``).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

GROUP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


@contextlib.contextmanager
def group_signals_blocked() -> Iterator[None]:
    """Block SIGINT and SIGTERM in the calling thread (never the main thread, which handles them) meanwhile."""
    import multiprocessing.resource_tracker

    # Started first: starting it ends by *unblocking* these two signals in the calling thread, which would undo
    # the block for the forkserver started next. It ignores them itself.
    multiprocessing.resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, GROUP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def leave_parent_process_group() -> None:
    """In a worker process: move to a process group of its own, drop the group signals that arrived before, and
    unblock them. Signal dispositions are left as the pool set them."""
    os.setpgid(0, 0)
    # Anything pending now was sent to the gateway's group before the move; it was meant for the gateway.
    while signal.sigtimedwait(GROUP_SIGNALS, 0) is not None:
        pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, GROUP_SIGNALS)
