"""Global admission: at most ``limit`` requests in flight; the rest are answered 503 + Retry-After at once.

Shedding at the door is what keeps a burst far beyond capacity from turning into a queue that times out: the
excess costs a few microseconds each and is told when to come back, while admitted requests keep their latency.
Probes and metrics are exempt, so that an overloaded gateway still reports itself alive and measurable.
"""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import OverloadedError
from app.problems import TYPE_PREFIX

SHED_REASON = "in_flight"


class AdmissionMiddleware:
    def __init__(self, app: ASGIApp, *, limit: int, retry_after_s: int, exempt: frozenset[str]) -> None:
        self.app = app
        self.limit = limit
        self.exempt = exempt
        self.in_flight = 0
        err = OverloadedError(f"more than {limit} requests in flight", retry_after_s=retry_after_s)
        # Rendered once: the shed path runs thousands of times a second in a burst and must stay cheap.
        body = orjson.dumps(
            {"type": TYPE_PREFIX + err.type, "title": err.title, "status": err.status, "detail": err.detail}
        )
        self._status = err.status
        self._headers = [
            (b"content-type", b"application/problem+json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(retry_after_s).encode()),
        ]
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            gateway = getattr(scope["app"].state, "gateway", None)
            if gateway is not None:
                gateway.metrics.shed.labels(SHED_REASON).inc()
            # A fresh header list: outer middleware appends to it.
            await send({"type": "http.response.start", "status": self._status, "headers": list(self._headers)})
            await send({"type": "http.response.body", "body": self._body})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
