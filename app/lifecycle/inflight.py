"""In-flight HTTP requests: counted, told to close their connection once the gateway drains, and cancelled with a
503 problem when the drain timeout passes (the front layer, app/middleware/front.py, outermost, runs each request
under its timeout).

Each request runs inside an ``asyncio.timeout`` with no deadline; the drain pulls that deadline in. Cancelling
through the request's own timeout (rather than letting uvicorn cancel its tasks) keeps the cancellation inside the
request: it unwinds the handler's TaskGroups, upstream calls and pool jobs, and the client still gets an answer.
"""

from __future__ import annotations

import asyncio


class InFlight:
    """The requests now running, and what the drain wants done with them. Used on the event loop only."""

    def __init__(self) -> None:
        self._timeouts: set[asyncio.Timeout] = set()
        self.deadline: float | None = None  # loop time; requests still running then are cancelled
        self.close_connections = False
        self.cancelled = 0

    def closing(self) -> bool:
        """True once the drain began: every answer closes its connection."""
        return self.close_connections

    def __len__(self) -> int:
        return len(self._timeouts)

    def cancel_at(self, when: float) -> None:
        """Cancel every request still running at loop time ``when`` (the earliest such call wins)."""
        if self.deadline is not None and self.deadline <= when:
            return
        self.deadline = when
        for timeout in self._timeouts:
            current = timeout.when()
            if current is None or current > when:
                timeout.reschedule(when)

    def _add(self, timeout: asyncio.Timeout) -> None:
        self._timeouts.add(timeout)

    def _discard(self, timeout: asyncio.Timeout) -> None:
        self._timeouts.discard(timeout)
