"""Child processes, after the server has stopped.

The gateway ends its children itself (the lifespan closes the CPU pool); ``stop_leftover_children()`` is the
safety net after the server has stopped, and ``kill_children()`` the last resort when the drain overran its bound.
How workers survive the signals meant for the gateway is app/worker/signals.py's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Collection

log = logging.getLogger("app.lifecycle")


def _helper_pids() -> set[int]:
    """The standard library's own helpers, which exit by themselves once the gateway has exited."""
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker

    pids: set[int] = set()
    # Private attributes, unchanged since Python 3.4; a missing one only makes the safety net stricter.
    forkserver_pid = getattr(getattr(multiprocessing.forkserver, "_forkserver", None), "_forkserver_pid", None)
    tracker_pid = getattr(getattr(multiprocessing.resource_tracker, "_resource_tracker", None), "_pid", None)
    for pid in (forkserver_pid, tracker_pid):
        if isinstance(pid, int):
            pids.add(pid)
    return pids


def stop_leftover_children(timeout: float = 1.0, *, keep: Collection[int] = ()) -> int:
    """Terminate, then kill, every descendant still running except the standard library's helpers, and ``keep``
    and their own descendants (processes the caller owns and stops itself, such as the demo's database).

    Called after the lifespan closed everything: normally nothing is left, and anything that is, is a bug that
    would otherwise outlive the gateway as an orphan. Returns how many were left.
    """
    import psutil

    spared = _helper_pids() | set(keep)
    try:
        # Recursive: the forkserver's workers are its children, not the gateway's.
        descendants = psutil.Process().children(recursive=True)
        # The kept processes' own descendants after the walk above, so that one they started meanwhile (a
        # database backend) is spared too, not taken for a leftover.
        for pid in keep:
            with contextlib.suppress(psutil.NoSuchProcess):
                spared.update(p.pid for p in psutil.Process(pid).children(recursive=True))
        leftovers = [p for p in descendants if p.pid not in spared and p.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return 0
    if not leftovers:
        return 0
    log.warning(
        "%d child process(es) outlived the lifespan; stopping them",
        len(leftovers),
        extra={"event": "leftover_children", "pids": [p.pid for p in leftovers]},
    )
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(leftovers, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout)
    return len(leftovers)


def kill_children() -> None:
    """Last resort: SIGKILL every descendant but the resource tracker, which outlives the gateway by design and
    then unlinks the semaphores and shared memory the gateway could not. Never raises."""
    import multiprocessing.resource_tracker

    import psutil

    tracker = getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None)
    try:
        procs = [p for p in psutil.Process().children(recursive=True) if p.pid != tracker]
    except psutil.Error:
        return
    # SIGKILL cannot be caught or ignored: no need to wait for the reaping, which is the parents' (or init's) job.
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
