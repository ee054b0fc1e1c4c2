"""Global admission: at most ``limit`` requests in the app at once; the rest are answered 503 + Retry-After at once.

Shedding at the door is what keeps a burst far beyond capacity from turning into a queue that times out. The door
is the HTTP protocol (app/security/protocol.py), not a middleware: a request shed there costs a parse and one
canned answer written straight to the socket, no task and no trip through the middleware stack, so that a burst
of thousands of connections leaves the event loop free to answer /healthz and the admitted requests. Probes and
metrics are exempt, so that an overloaded gateway still reports itself alive and measurable.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson

from app.errors import OverloadedError
from app.middleware.security_headers import HEADERS as SECURITY_HEADERS
from app.problems import TYPE_PREFIX

SHED_REASON = "in_flight"


class Admission:
    """The in-flight count of one server, shared by all its connections (all on one event loop: no lock)."""

    def __init__(self, *, limit: int, retry_after_s: int, exempt: frozenset[str]) -> None:
        self.limit = limit
        self.exempt = exempt
        self.in_flight = 0
        self.shed_total = 0
        self._on_shed: Callable[[], None] | None = None
        # Set by the drain: answers given in the protocol (shed 503s, /healthz) then close their connection too,
        # as every answer from the app does, so keep-alive clients reconnect through the updated endpoints.
        self.closing: Callable[[], bool] = lambda: False
        err = OverloadedError(f"more than {limit} requests in flight", retry_after_s=retry_after_s)
        # Rendered once: the shed path runs thousands of times a second in a burst and must stay cheap.
        self._body = orjson.dumps(
            {"type": TYPE_PREFIX + err.type, "title": err.title, "status": err.status, "detail": err.detail}
        )
        headers = [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(self._body)).encode()),
            (b"retry-after", str(retry_after_s).encode()),
            *SECURITY_HEADERS,
        ]
        self._head = b"HTTP/1.1 503 Service Unavailable\r\n" + b"".join(b"%s: %s\r\n" % h for h in headers)

    def observe(self, on_shed: Callable[[], None]) -> None:
        """Call ``on_shed`` for every shed request (the metrics hook)."""
        self._on_shed = on_shed

    def admits(self, path: str) -> bool:
        return path in self.exempt or self.in_flight < self.limit

    def enter(self) -> None:
        """Count one request in, at the moment it is admitted (not when its task first runs: a burst admits many
        in one turn of the loop, and each must see the others)."""
        self.in_flight += 1

    def leave(self, _: object = None) -> None:
        self.in_flight -= 1

    def shed(self) -> tuple[bytes, bytes]:
        """Count one request shed; returns the status line with headers, and the body, of its answer."""
        self.shed_total += 1
        if self._on_shed is not None:
            self._on_shed()
        return self._head, self._body
