"""Code that runs inside process-pool workers. Top-level, importable, picklable, no import-time side effects."""

from __future__ import annotations

import os
import signal


def init_worker() -> None:
    """Worker initializer: survive signals sent to the whole process group, and pay imports up front.

    Ctrl-C or ``tini -g`` signal every process of the group; a worker that died of it would drop the job the
    gateway is still draining. The gateway ends its workers itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import numpy  # noqa: F401  (warm: the first request must not pay numpy's import)


def ping() -> int:
    return os.getpid()
