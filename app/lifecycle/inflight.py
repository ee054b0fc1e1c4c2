"""In-flight HTTP requests: counted, told to close their connection once the gateway drains, and cancelled with a
503 problem when the drain timeout passes. A pure ASGI middleware, outermost, so it sees every request.

Each request runs inside an ``asyncio.timeout`` with no deadline; the drain pulls that deadline in. Cancelling
through the request's own timeout (rather than letting uvicorn cancel its tasks) keeps the cancellation inside the
request: it unwinds the handler's TaskGroups, upstream calls and pool jobs, and the client still gets an answer.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ShuttingDownError
from app.problems import response_for


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


class InFlightMiddleware:
    def __init__(self, app: ASGIApp, in_flight: InFlight) -> None:
        self.app = app
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        in_flight = self.in_flight
        response_started = False

        async def send_marked(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                if in_flight.close_connections:
                    # While draining, no connection is reused: a client's next request opens a new connection,
                    # which the endpoints update routes elsewhere; and none is left idle for the listener's close
                    # to race with a request already on the wire.
                    headers = list(message.get("headers", ()))
                    if not any(name.lower() == b"connection" for name, _ in headers):
                        headers.append((b"connection", b"close"))
                    message = {**message, "headers": headers}
            await send(message)

        timeout = asyncio.timeout(in_flight.deadline)
        try:
            async with timeout:
                in_flight._add(timeout)
                try:
                    await self.app(scope, receive, send_marked)
                finally:
                    in_flight._discard(timeout)
        except TimeoutError:
            if not timeout.expired():
                raise  # the handler's own timeout, not the drain's
            in_flight.cancelled += 1
            if not response_started:
                detail = "the gateway is shutting down and could not finish this request in time; retry it"
                await response_for(ShuttingDownError(detail))(scope, receive, send)
            # A response already under way cannot be replaced: uvicorn closes the connection after it.
