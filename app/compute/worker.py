"""Code that runs inside process-pool workers. Top-level, importable, picklable, no import-time side effects."""

from __future__ import annotations

import os

from app.lifecycle.children import leave_parent_process_group


def init_worker() -> None:
    """Worker initializer: out of reach of signals sent to the whole process group, and imports paid up front.

    Ctrl-C or ``tini -g`` signal every process of the group; a worker that died of it would drop the job the
    gateway is still draining. The gateway ends its workers itself: SIGTERM from the pool stops one at once.
    """
    leave_parent_process_group()
    import numpy  # noqa: F401  (warm: the first request must not pay numpy's import)


def ping() -> int:
    return os.getpid()
