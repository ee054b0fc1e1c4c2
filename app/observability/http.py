"""HTTP metrics and the one-line-per-request log, as pure ASGI middleware.

Labels use the route template (``/aggregate/{composite}``), never the raw path, so thousands of distinct paths
cannot blow up the metric's cardinality; requests that match no route are counted under ``<unmatched>``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.middleware.request_id import request_id_of
from app.observability.logging import request_trace
from app.observability.tracing import log_ids

log = logging.getLogger("app.access")

UNMATCHED = "<unmatched>"
SUMMARY_KEY = "log_summary"


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


def add_log_fields(scope: Scope, **fields: Any) -> None:
    """Attach compact fields (e.g. an aggregate's per-source summary) to this request's log line."""
    scope.setdefault("state", {}).setdefault(SUMMARY_KEY, {}).update(fields)


class HttpMetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gateway = getattr(scope["app"].state, "gateway", None)
        metrics = gateway.metrics if gateway is not None else None
        started = time.perf_counter()
        status = 500  # what the server answers if the app raises before starting a response

        async def send_tracking(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        tracing = gateway.tracing if gateway is not None else None
        span_cm = tracing.request_span(scope, scope["method"]) if tracing is not None else contextlib.nullcontext()
        token = None
        try:
            with span_cm as span:
                # Until the access line below is written: every log line of this request carries the trace.
                token = request_trace.set(log_ids(scope, span))
                try:
                    await self.app(scope, receive, send_tracking)
                finally:
                    if span is not None:
                        span.update_name(f"{scope['method']} {route_template(scope)}")
                        span.set_attribute("http.route", route_template(scope))
                        span.set_attribute("http.response.status_code", status)
        finally:
            elapsed = time.perf_counter() - started
            route = route_template(scope)
            method = scope["method"] if route != UNMATCHED else "other"
            if metrics is not None:
                metrics.requests.labels(route, method, str(status)).inc()
                metrics.request_latency.labels(route, method).observe(elapsed)
            if route not in ("/healthz", "/readyz", "/metrics"):
                extra = {
                    "event": "request",
                    "request_id": request_id_of(scope),
                    "method": scope["method"],
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                    **scope.get("state", {}).get(SUMMARY_KEY, {}),
                }
                log.info("%s %s %d %.1f ms", scope["method"], route, status, elapsed * 1000, extra=extra)
        # Reset only after a normal end. After an error the ids stay for the line Starlette's outermost error
        # middleware logs next; the request's task, whose context this is, ends with it.
        if token is not None:
            request_trace.reset(token)
