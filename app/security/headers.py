"""What every answer and every request head is held to, wherever it is decided: in the app's middleware
(app/middleware/) or in the HTTP protocol before the app (app/security/protocol.py, app/security/admission.py).

``SECURITY_HEADERS``: response headers for a JSON API that no browser should render, frame, cache or sniff.
``head_problem``: the limits on a parsed request head (header count and size, URL length, query parameters); the
protocol already bounded the head's total size and time while it arrived.
"""

from __future__ import annotations

from starlette.types import Scope

from app.errors import (
    HeadersTooLargeError,
    ProblemError,
    TooManyHeadersError,
    TooManyQueryParamsError,
    UriTooLongError,
)
from app.settings import LimitSettings

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-store"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
)


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
