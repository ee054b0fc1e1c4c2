"""The gateway's exceptions, one tree. Library errors are mapped at the boundary to the most specific leaf.

GatewayError
├── ConfigError                 the configuration is invalid; start-up refuses (one message per problem)
├── ResourceClosedError         a resource was used after aclose()
├── StartupError                a resource could not be opened (the database is unreachable, ...)
├── ProblemError                answered to the client as an RFC 9457 problem (app/problems.py)
│   ├── BadRequestError         400: the request is malformed or names things that do not exist
│   │   └── ValidationFailedError  422: the request is well-formed but its values are wrong
│   ├── NotFoundError           404
│   ├── PayloadTooLargeError    413
│   ├── ClientDisconnectedError 499: the client went away; its work was cancelled (nobody reads the answer)
│   ├── OverloadedError         503 + Retry-After: a bounded queue is full; the work was never started
│   └── ShuttingDownError       503 + Retry-After: the drain timeout passed (or a second signal came) mid-request
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


class NotFoundError(ProblemError):
    status = 404
    type = "not-found"
    title = "Not found"


class PayloadTooLargeError(ProblemError):
    status = 413
    type = "payload-too-large"
    title = "Payload too large"


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


class ShuttingDownError(ProblemError):
    status = 503
    type = "shutting-down"
    title = "Shutting down"

    def headers(self) -> dict[str, str]:
        # The request was cut short by this instance stopping; another instance can take it at once.
        return {"Retry-After": "0", "Connection": "close"}


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
