"""The one ASGI layer around the app: every cross-cutting rule a request meets, in one place and one pass.

Before it, in the HTTP protocol (app/security/protocol.py): the head's size and time bounds, /healthz, and the
global in-flight limit. Here, from the outside in:

    in flight        counted for the drain, which cancels what overruns it (503 shutting-down)
    request id       every answer carries one (taken from a well-formed X-Request-ID, or made)
    metrics, log     every answer counted, timed and logged (one line; probes and /metrics are not logged)
    security headers on every answer
    CORS             only when origins are configured: outside the refusals, so a browser can read them
    head limits      header count and size, URL, query parameters: 4xx, connection closed
    auth             401 / 403 / 429 before any body is read
    body limit       413 as soon as the declared or the received size passes the cap
    JSON depth       400 before any parser recurses into the body

One ``send`` wrapper does what each answer needs (status, request id, security headers, ``connection: close``
while draining) and one ``receive`` wrapper counts the body, instead of a closure per rule per request. POST
/aggregate, the hottest route, is served from here (``hot``), its body read once; everything else goes to the
FastAPI app, whose own exception handlers answer its errors. Errors raised here or by the hot route are answered
by app/problems.py's one mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from fastapi.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import JsonTooDeepError, NotReadyError, PayloadTooLargeError, ShuttingDownError
from app.lifecycle.inflight import InFlight
from app.middleware.request_id import HEADER as REQUEST_ID
from app.middleware.request_id import new_request_id
from app.observability.http import SUMMARY_KEY, UNMATCHED, route_template
from app.observability.logging import request_trace
from app.observability.tracing import log_ids
from app.problems import response_for, response_for_exception
from app.security.access import OPEN, AccessRules
from app.security.headers import SECURITY_HEADERS, head_problem
from app.security.jsondepth import exceeds_depth
from app.security.policy import PRINCIPAL_KEY
from app.state import GatewayState

access_log = logging.getLogger("app.access")

# Routes whose requests are counted but not logged: probes and scrapes would drown the log.
UNLOGGED = frozenset({"/healthz", "/readyz", "/metrics"})
_WITH_BODY = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_CONNECTION_CLOSE = (b"connection", b"close")
_ANSWER = "front.answer"

HotRoute = Callable[[Scope, bytes, Receive, Send], Awaitable[None]]


class BodyTooLarge(HTTPException):
    """Raised from receive(); an HTTPException, so that the app's body parsing re-raises it (answered 413 by its
    handler) instead of answering 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds {limit} bytes", headers={"Connection": "close"})


def is_json(scope: Scope) -> bool:
    """Whether the app would parse this body as JSON (no content type, ``application/json``, ``+json``)."""
    ctype: bytes | None = next((v for k, v in scope["headers"] if k == b"content-type"), None)
    if ctype is None:
        return True  # checked too: cheap, and whatever later parses it meets a body of bounded depth
    media = ctype.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


class Front:
    """``hot``: POST /aggregate's handler, called with the whole body (``route`` labels its metrics); ``exempt``
    path prefixes stream and check their own bodies (no JSON depth check, their own cap)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        state: GatewayState,
        rules: AccessRules,
        hot: HotRoute,
        hot_route: object,
        body_limits: dict[str, int],
        exempt_from_depth: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.state = state
        self.settings = settings = state.settings
        self.limits = settings.limits
        self.rules = rules
        self.hot = hot
        self.hot_route = hot_route
        self.in_flight: InFlight = state.in_flight
        self.auth = settings.auth.enabled
        self.body_limits = sorted(body_limits.items(), key=lambda item: -len(item[0]))
        self.exempt = exempt_from_depth
        cors = settings.cors
        self.inner: ASGIApp = self._inner
        if cors.allow_origins:
            self.inner = CORSMiddleware(
                self._inner,
                allow_origins=cors.allow_origins,
                allow_credentials=cors.allow_credentials,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID"],
                expose_headers=["X-Request-ID", "X-Aggregate-Complete", "Retry-After"],
                max_age=cors.max_age_s,
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # the lifespan
            return
        state = scope.setdefault("state", {})
        rid = new_request_id(scope["headers"])
        state["request_id"] = rid
        answer = state[_ANSWER] = _Answer(send, rid.encode("ascii"), self.in_flight)
        in_flight = self.in_flight
        metrics = self.state.metrics
        tracing = self.state.tracing
        started = time.perf_counter()
        span_cm = tracing.request_span(scope, scope["method"]) if tracing is not None else contextlib.nullcontext()
        timeout = asyncio.timeout(in_flight.deadline)
        token = None
        try:
            with span_cm as span:
                # Until the access line below is written: every log line of this request carries the trace.
                token = request_trace.set(log_ids(scope, span))
                try:
                    async with timeout:
                        in_flight._add(timeout)
                        try:
                            await self.inner(scope, receive, answer.send)
                        finally:
                            in_flight._discard(timeout)
                except TimeoutError:
                    if not timeout.expired():
                        raise  # the handler's own timeout, not the drain's
                    in_flight.cancelled += 1
                    if not answer.started:
                        detail = "the gateway is shutting down and could not finish this request in time; retry it"
                        await response_for(ShuttingDownError(detail))(scope, receive, answer.send)
                    # A response already under way cannot be replaced: uvicorn closes the connection after it.
                finally:
                    if span is not None:
                        route = route_template(scope)
                        span.update_name(f"{scope['method']} {route}")
                        span.set_attribute("http.route", route)
                        span.set_attribute("http.response.status_code", answer.status)
        finally:
            elapsed = time.perf_counter() - started
            route = route_template(scope)
            method = scope["method"] if route != UNMATCHED else "other"
            status = answer.status
            if metrics is not None:
                metrics.requests.labels(route, method, str(status)).inc()
                metrics.request_latency.labels(route, method).observe(elapsed)
                if answer.complete in (b"true", b"false"):
                    metrics.aggregate_answers.labels(route, answer.complete.decode()).inc()
            if route not in UNLOGGED and access_log.isEnabledFor(logging.INFO):
                extra = {
                    "event": "request",
                    "request_id": rid,
                    "method": scope["method"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                    **state.get(SUMMARY_KEY, {}),
                }
                access_log.info("%s %s %d %.1f ms", scope["method"], route, status, elapsed * 1000, extra=extra)
        # Reset only after a normal end: after an error the ids stay for the line uvicorn logs next; the request's
        # task, whose context this is, ends with it.
        if token is not None:
            request_trace.reset(token)

    async def _inner(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Inside CORS (when configured), so that a browser can read the refusals answered here.
        try:
            await self._guarded(scope, receive, send)
        except Exception as exc:
            if scope["state"][_ANSWER].started:
                raise  # too late for another answer: uvicorn logs it and closes the connection
            if isinstance(exc, BodyTooLarge):
                response = response_for(PayloadTooLargeError(str(exc.detail)), close=True)
            else:
                response = response_for_exception(scope, exc)
            await response(scope, receive, send)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = head_problem(scope, self.limits)
        if err is not None:
            await response_for(err, close=True)(scope, receive, send)
            return
        path: str = scope["path"]
        if self.auth:
            needed = self.rules.scope_for(path)
            if needed != OPEN:
                guard = self.state.guard
                if guard is None:
                    raise NotReadyError("the gateway is not ready")
                principal = await guard.authenticate(scope["headers"])
                if needed is not None:
                    guard.authorize(principal, needed)
                await guard.admit(principal)
                scope["state"][PRINCIPAL_KEY] = principal
        method = scope["method"]
        limit = self._limit_for(path)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            raise BodyTooLarge(limit)
        hot = method == "POST" and path == "/aggregate"
        json_body = is_json(scope)
        if not hot and (method not in _WITH_BODY or path.startswith(self.exempt) or not json_body):
            await self.app(scope, _counting(receive, limit), send)
            return
        body, more = await _read_body(receive, limit)
        if more is not None:
            # The client went away mid-body: let the app see exactly that.
            await self.app(scope, _replay(more, receive), send)
            return
        if json_body and exceeds_depth(body, self.limits.max_json_depth):
            raise JsonTooDeepError(f"the JSON body nests deeper than {self.limits.max_json_depth} levels")
        if hot:
            scope["app"] = self.app
            scope["route"] = self.hot_route
            await self.hot(scope, body, receive, send)
            return
        await self.app(scope, _replay({"type": "http.request", "body": body, "more_body": False}, receive), send)

    def _limit_for(self, path: str) -> int:
        for prefix, limit in self.body_limits:
            if path.startswith(prefix):
                return limit
        return self.limits.max_body_bytes


class _Answer:
    """The one ``send`` wrapper: what every answer gets, added once."""

    __slots__ = ("_in_flight", "_rid", "_send", "complete", "started", "status")

    def __init__(self, send: Send, rid: bytes, in_flight: InFlight) -> None:
        self._send = send
        self._rid = rid
        self._in_flight = in_flight
        self.started = False
        self.status = 500  # what the server answers if the app raises before starting a response
        self.complete: bytes | None = None  # an aggregate's X-Aggregate-Complete header

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.status = message["status"]
            headers = []
            present = set()
            for name, value in message.get("headers", ()):
                lower = name.lower()
                if lower == REQUEST_ID:
                    continue
                if lower == b"x-aggregate-complete":
                    self.complete = bytes(value)
                headers.append((name, value))
                present.add(lower)
            # A route that chose its own (a cacheable answer, say) keeps it.
            headers.extend(h for h in SECURITY_HEADERS if h[0] not in present)
            headers.append((REQUEST_ID, self._rid))
            if self._in_flight.close_connections and b"connection" not in present:
                # While draining, no connection is reused: a client's next request opens a new connection, which
                # the endpoints update routes elsewhere.
                headers.append(_CONNECTION_CLOSE)
            message["headers"] = headers
        await self._send(message)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, Message | None]:
    """The whole body, or (what was read, the message that ended it early) when the client went away."""
    chunks: list[bytes] = []
    seen = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"", message
        chunk: bytes = message.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks), None


def _counting(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def counting_receive() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return counting_receive


def _replay(message: Message, receive: Receive) -> Receive:
    pending: list[Message] = [message]

    async def replaying_receive() -> Message:
        # After the body, receive() is how a handler learns of a disconnect: hand it to the real one.
        return pending.pop() if pending else await receive()

    return replaying_receive
