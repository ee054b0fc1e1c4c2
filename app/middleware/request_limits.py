"""Limits on the request head, checked before anything else reads it: header count and size, URL length, number
of query parameters. Each is answered with its own problem type, and the connection is closed after it.

The HTTP protocol (app/security/protocol.py) already bounded the head's total size and time while it arrived;
these are the finer limits, on the parsed head.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import (
    HeadersTooLargeError,
    ProblemError,
    TooManyHeadersError,
    TooManyQueryParamsError,
    UriTooLongError,
)
from app.problems import response_for
from app.settings import LimitSettings


def head_problem(scope: Scope, limits: LimitSettings) -> ProblemError | None:
    """The first limit this request's head breaks, or None."""
    headers = scope["headers"]
    if len(headers) > limits.max_headers:
        return TooManyHeadersError(f"more than {limits.max_headers} header fields")
    size = sum(len(name) + len(value) for name, value in headers)
    if size > limits.max_header_bytes:
        return HeadersTooLargeError(f"header fields exceed {limits.max_header_bytes} bytes")
    query: bytes = scope.get("query_string", b"")
    path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape")
    if len(path) + len(query) > limits.max_url_bytes:
        return UriTooLongError(f"path and query string exceed {limits.max_url_bytes} bytes")
    if query and sum(1 for pair in query.split(b"&") if pair) > limits.max_query_params:
        return TooManyQueryParamsError(f"more than {limits.max_query_params} query parameters")
    return None


class RequestLimitsMiddleware:
    def __init__(self, app: ASGIApp, *, limits: LimitSettings) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            err = head_problem(scope, self.limits)
            if err is not None:
                await response_for(err, close=True)(scope, receive, send)
                return
        await self.app(scope, receive, send)
