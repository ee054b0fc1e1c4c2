"""The gateway's exceptions, one tree. Library errors are mapped at the boundary to the most specific leaf.

GatewayError
├── ConfigError                 the configuration is invalid; start-up refuses (one message per problem)
├── ResourceClosedError         a resource was used after aclose()
├── StartupError                a resource could not be opened (the database is unreachable, ...)
├── RateLimitBackendError       the shared rate-limit backend did not answer; [rate_limit] failure_mode decides
├── ProblemError                answered to the client as an RFC 9457 problem (app/problems.py)
│   ├── BadRequestError         400: the request is malformed or names things that do not exist
│   │   ├── ValidationFailedError  422: the request is well-formed but its values are wrong
│   │   │   └── TooManySourcesError     422: more sources than limits.max_sources
│   │   ├── JsonTooDeepError    400: the body nests deeper than limits.max_json_depth
│   │   └── TooManyQueryParamsError  400: more query parameters than limits.max_query_params
│   ├── UnauthorizedError       401 + WWW-Authenticate: no valid API key
│   ├── ForbiddenError          403: the key lacks the scope, or a source is outside its allowlist
│   ├── NotFoundError           404
│   ├── RequestTimeoutError     408: the request head did not arrive within limits.request_head_timeout_s
│   ├── PayloadTooLargeError    413: the body is larger than limits.max_body_bytes
│   │   └── TooManyElementsError     413: a transform input has more than limits.max_transform_elements
│   ├── UriTooLongError         414: path and query longer than limits.max_url_bytes
│   ├── RateLimitedError        429 + Retry-After: the key's token bucket is empty
│   ├── HeadersTooLargeError    431: header names and values larger than limits.max_header_bytes
│   │   └── TooManyHeadersError      431: more header fields than limits.max_headers
│   ├── ClientDisconnectedError 499: the client went away; its work was cancelled (nobody reads the answer)
│   └── OverloadedError         503 + Retry-After: a bounded queue or the in-flight limit is full; nothing started
└── SourceError                 one source of an aggregate failed; reported per source, never as HTTP
    ├── UpstreamError
    │   ├── UpstreamTimeoutError   timeout: one attempt overran its per-try timeout
    │   ├── UpstreamConnectError   connect: no connection, or it broke before an answer
    │   ├── UpstreamStatusError    upstream_status: the upstream answered with an error status
    │   ├── ResponseTooLargeError  too_large: the body exceeded max_response_bytes
    │   ├── BadResponseError       bad_response: the body was not the JSON it claimed to be
    │   └── CircuitOpenError       circuit_open: the breaker is open, nothing was sent
    ├── DeadlineExceededError   deadline: the request's deadline passed before the source finished
    ├── DatabaseError           db_error: the query failed on the server
    │   ├── DatabaseUnavailableError  db_unavailable: no connection could be had
    │   └── QueryTimeoutError   timeout: statement_timeout cancelled the query
    └── SourceOverloadedError   overloaded: the DB executor queue was full
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


class ResourceClosedError(GatewayError):
    pass


class StartupError(GatewayError):
    pass


class RateLimitBackendError(GatewayError):
    pass


class ProblemError(GatewayError):
    status: int = 500
    type: str = "internal"
    title: str = "Internal error"

    def __init__(self, detail: str, *, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors or []

    def headers(self) -> dict[str, str]:
        return {}


class BadRequestError(ProblemError):
    status = 400
    type = "bad-request"
    title = "Bad request"


class ValidationFailedError(BadRequestError):
    status = 422
    type = "validation"
    title = "Request validation failed"


class TooManySourcesError(ValidationFailedError):
    type = "too-many-sources"
    title = "Too many sources"


class JsonTooDeepError(BadRequestError):
    type = "json-too-deep"
    title = "JSON nested too deeply"


class TooManyQueryParamsError(BadRequestError):
    type = "too-many-query-params"
    title = "Too many query parameters"


class UnauthorizedError(ProblemError):
    status = 401
    type = "unauthorized"
    title = "Unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="gateway"'}


class ForbiddenError(ProblemError):
    status = 403
    type = "forbidden"
    title = "Forbidden"


class NotFoundError(ProblemError):
    status = 404
    type = "not-found"
    title = "Not found"


class RequestTimeoutError(ProblemError):
    status = 408
    type = "request-timeout"
    title = "Request timeout"


class PayloadTooLargeError(ProblemError):
    status = 413
    type = "payload-too-large"
    title = "Payload too large"


class TooManyElementsError(PayloadTooLargeError):
    type = "too-many-elements"
    title = "Too many elements"


class UriTooLongError(ProblemError):
    status = 414
    type = "uri-too-long"
    title = "URI too long"


class RateLimitedError(ProblemError):
    status = 429
    type = "rate-limited"
    title = "Too many requests"

    def __init__(self, detail: str, *, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class HeadersTooLargeError(ProblemError):
    status = 431
    type = "headers-too-large"
    title = "Request header fields too large"


class TooManyHeadersError(HeadersTooLargeError):
    type = "too-many-headers"
    title = "Too many request header fields"


class ClientDisconnectedError(ProblemError):
    status = 499
    type = "client-disconnected"
    title = "Client disconnected"


class OverloadedError(ProblemError):
    status = 503
    type = "overloaded"
    title = "Overloaded"

    def __init__(self, detail: str, *, retry_after_s: int = 1) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class SourceError(GatewayError):
    """A failed source. ``kind`` is the closed set of error types documented in the README."""

    kind: str = "error"

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.attempts = 1


class UpstreamError(SourceError):
    kind = "upstream_error"


class UpstreamTimeoutError(UpstreamError):
    kind = "timeout"


class UpstreamConnectError(UpstreamError):
    kind = "connect"


class UpstreamStatusError(UpstreamError):
    kind = "upstream_status"
    retry_after: str | None = None


class ResponseTooLargeError(UpstreamError):
    kind = "too_large"


class BadResponseError(UpstreamError):
    kind = "bad_response"


class CircuitOpenError(UpstreamError):
    kind = "circuit_open"


class DeadlineExceededError(SourceError):
    kind = "deadline"


class DatabaseError(SourceError):
    kind = "db_error"


class DatabaseUnavailableError(DatabaseError):
    kind = "db_unavailable"


class QueryTimeoutError(DatabaseError):
    kind = "timeout"


class SourceOverloadedError(SourceError):
    kind = "overloaded"
