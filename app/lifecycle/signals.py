"""SIGTERM and SIGINT before and after the server's own handlers.

As PID 1 of a container, a process receives only the signals it has a handler for: a SIGTERM arriving while
Python imports the gateway would be dropped, and Kubernetes would wait out the whole grace period before SIGKILL.
``EarlySignals`` is installed first thing by the CLI; the server replays what it recorded (stopping before it
starts) and, when uvicorn restores the previous handlers on its way out, it records and ignores signals during the
final clean-up instead of raising KeyboardInterrupt in the middle of it.
"""

from __future__ import annotations

import signal
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)


class EarlySignals:
    def __init__(self) -> None:
        self.received: list[int] = []

    def install(self) -> EarlySignals:
        """Install the handlers (main thread only). Returns self."""
        for sig in HANDLED:
            signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)

    def take(self) -> list[int]:
        received, self.received = self.received, []
        return received
