"""The gateway's exceptions, one tree. Library errors are mapped at the boundary to the most specific leaf.

GatewayError
├── ConfigError                 the configuration is invalid; start-up refuses (one message per problem)
├── ResourceClosedError         a resource was used after aclose()
├── StartupError                a resource could not be opened (the database is unreachable, ...)
├── RateLimitBackendError       the shared rate-limit backend did not answer; [rate_limit] failure_mode decides
├── CacheBackendError           the shared cache did not answer in time; the lookup is a miss, the source goes on
├── ProblemError                answered to the client as an RFC 9457 problem (app/problems.py)
│   ├── BadRequestError         400: the request is malformed or names things that do not exist
│   │   ├── MalformedInputError    400: the body is not the JSON or .npy it claims to be, or is cut short
│   │   ├── JsonTooDeepError       400: the body nests deeper than limits.max_json_depth
│   │   ├── TooManyQueryParamsError  400: more query parameters than limits.max_query_params
│   │   └── ValidationFailedError  422: the request is well-formed but its values are wrong
│   │       ├── TooManySourcesError    more sources than limits.max_sources
│   │       ├── InvalidParamsError     the transform's params do not validate
│   │       ├── NonNumericDataError    data holds strings, booleans, null or objects
│   │       ├── RaggedDataError        nested lists of unequal lengths or depths
│   │       ├── UnsupportedDtypeError  an element type the transform does not accept
│   │       ├── UnsupportedRankError   a number of dimensions the transform does not accept
│   │       ├── TooManyElementsError   more elements than the transform or compute.max_elements allows
│   │       ├── NonFiniteDataError     NaN or infinity where the transform forbids them
│   │       └── InvalidInputError      values the transform refuses (out of range, empty, ...)
│   ├── UnauthorizedError       401 + WWW-Authenticate: no credentials, or no valid API key
│   │   └── InvalidTokenError       401, error="invalid_token" (RFC 6750): a bearer JWT that does not verify
│   │       ├── MalformedTokenError     not a JWT, too long, or its header or claims are unreadable
│   │       ├── TokenAlgorithmError     alg outside [auth.jwt] algorithms (none, HS256, ...) or not its key's
│   │       ├── UnknownSigningKeyError  no key with its kid, even after fetching the JWKS again
│   │       ├── BadSignatureError       the signature does not verify
│   │       ├── TokenExpiredError       exp has passed, beyond the leeway
│   │       ├── TokenNotYetValidError   nbf or iat is in the future, beyond the leeway
│   │       ├── TokenIssuerError        iss is not [auth.jwt] issuer
│   │       ├── TokenAudienceError      aud does not name [auth.jwt] audience
│   │       └── TokenClaimsError        a required claim (exp, iss, aud, sub) is missing, or one is of the wrong type
│   ├── ForbiddenError          403: the key lacks the scope, or a source is outside its allowlist
│   │   └── InsufficientScopeError  403, error="insufficient_scope": the token lacks the scope
│   ├── NotFoundError           404
│   ├── NotAcceptableError      406: no answer format the client accepts
│   ├── ProfilerBusyError       409: a profile is already running (/debug/profile)
│   ├── RequestTimeoutError     408: the request head or body did not arrive within its time limit
│   ├── PayloadTooLargeError    413: the body is larger than its cap
│   ├── UriTooLongError         414: path and query longer than limits.max_url_bytes
│   ├── UnsupportedMediaTypeError  415
│   ├── RateLimitedError        429 + Retry-After: the key's token bucket is empty
│   ├── HeadersTooLargeError    431: header names and values larger than limits.max_header_bytes
│   │   └── TooManyHeadersError      431: more header fields than limits.max_headers
│   ├── ClientDisconnectedError 499: the client went away; its work was cancelled (nobody reads the answer)
│   ├── TransformFailedError    500: a transform raised or returned something unusable (a bug in it)
│   ├── SigningKeysUnavailableError  503 + Retry-After: no JWKS has been fetched yet (the identity provider is down)
│   ├── OverloadedError         503 + Retry-After: a bounded queue or the in-flight limit is full; nothing started
│   │   └── WorkerUnavailableError  no worker became free within queue_timeout_s
│   ├── NotReadyError           503 + Retry-After: the gateway has not started, or the resource is closed
│   ├── WorkerCrashedError      503 + Retry-After: the worker process died while running the job
│   ├── ShuttingDownError       503 + Retry-After: the drain timeout passed (or a second signal came) mid-request
│   └── TransformTimeoutError   504: the job overran job_timeout_s; its worker was killed and replaced
└── SourceError                 one source of an aggregate failed; reported per source, never as HTTP
    ├── UpstreamError
    │   ├── UpstreamTimeoutError   timeout: one attempt overran its per-try or connect timeout
    │   ├── UpstreamConnectError   connect: no connection, or it broke before an answer
    │   ├── UpstreamStatusError    upstream_status: the upstream answered with an error status
    │   ├── ResponseTooLargeError  too_large: the body exceeded max_response_bytes
    │   ├── BadResponseError       bad_response: the body was not the JSON it claimed to be
    │   └── CircuitOpenError       circuit_open: the breaker is open, nothing was sent
    ├── DeadlineExceededError   deadline: the request's deadline passed before the source finished
    ├── DependencyFailedError   dependency_failed: a source it refers to failed, was skipped, or gave no usable value
    ├── TooManyItemsError       too_many_items: a for_each list longer than max_items, or past limits.max_sources
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


class CacheBackendError(GatewayError):
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


# RFC 6750 section 3: an error_description holds no quote, backslash or control character.
_DESCRIPTION_UNSAFE = str.maketrans({'"': "'", "\\": "/"})


class InvalidTokenError(UnauthorizedError):
    type = "invalid-token"
    title = "Invalid bearer token"
    reason = "token"  # the auth-failure metric's label: a closed set, one per leaf

    def headers(self) -> dict[str, str]:
        description = "".join(c for c in self.detail.translate(_DESCRIPTION_UNSAFE) if " " <= c <= "~")
        return {"WWW-Authenticate": f'Bearer realm="gateway", error="invalid_token", error_description="{description}"'}


class MalformedTokenError(InvalidTokenError):
    reason = "token_malformed"


class TokenAlgorithmError(InvalidTokenError):
    reason = "token_algorithm"


class UnknownSigningKeyError(InvalidTokenError):
    reason = "token_unknown_key"


class BadSignatureError(InvalidTokenError):
    reason = "token_signature"


class TokenExpiredError(InvalidTokenError):
    reason = "token_expired"


class TokenNotYetValidError(InvalidTokenError):
    reason = "token_not_yet_valid"


class TokenIssuerError(InvalidTokenError):
    reason = "token_issuer"


class TokenAudienceError(InvalidTokenError):
    reason = "token_audience"


class TokenClaimsError(InvalidTokenError):
    reason = "token_claims"


class ForbiddenError(ProblemError):
    status = 403
    type = "forbidden"
    title = "Forbidden"


class InsufficientScopeError(ForbiddenError):
    type = "insufficient-scope"
    title = "Insufficient scope"

    def __init__(self, detail: str, *, scope: str) -> None:
        super().__init__(detail)
        self.scope = scope

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": f'Bearer realm="gateway", error="insufficient_scope", scope="{self.scope}"'}


class SigningKeysUnavailableError(ProblemError):
    status = 503
    type = "signing-keys-unavailable"
    title = "Signing keys unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


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


class MalformedInputError(BadRequestError):
    type = "malformed-input"
    title = "Malformed input"


class InvalidParamsError(ValidationFailedError):
    type = "invalid-params"
    title = "Invalid transform parameters"


class NonNumericDataError(ValidationFailedError):
    type = "non-numeric-data"
    title = "Data is not numeric"


class RaggedDataError(ValidationFailedError):
    type = "ragged-data"
    title = "Data is not a rectangular array"


class UnsupportedDtypeError(ValidationFailedError):
    type = "unsupported-dtype"
    title = "Unsupported element type"


class UnsupportedRankError(ValidationFailedError):
    type = "unsupported-rank"
    title = "Unsupported number of dimensions"


class TooManyElementsError(ValidationFailedError):
    type = "too-many-elements"
    title = "Too many elements"


class NonFiniteDataError(ValidationFailedError):
    type = "non-finite-data"
    title = "Data holds NaN or infinity"


class InvalidInputError(ValidationFailedError):
    type = "invalid-input"
    title = "Input refused by the transform"


class NotAcceptableError(ProblemError):
    status = 406
    type = "not-acceptable"
    title = "Not acceptable"


class UnsupportedMediaTypeError(ProblemError):
    status = 415
    type = "unsupported-media-type"
    title = "Unsupported media type"


class TransformFailedError(ProblemError):
    status = 500
    type = "transform-failed"
    title = "Transform failed"


class OverloadedError(ProblemError):
    status = 503
    type = "overloaded"
    title = "Overloaded"

    def __init__(self, detail: str, *, retry_after_s: int = 1) -> None:
        super().__init__(detail)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class ProfilerBusyError(ProblemError):
    status = 409
    type = "profiler-busy"
    title = "A profile is already running"


class NotReadyError(ProblemError):
    status = 503
    type = "unavailable"
    title = "Unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class ShuttingDownError(ProblemError):
    status = 503
    type = "shutting-down"
    title = "Shutting down"

    def headers(self) -> dict[str, str]:
        # The request was cut short by this instance stopping; another instance can take it at once.
        return {"Retry-After": "0", "Connection": "close"}


class WorkerUnavailableError(OverloadedError):
    type = "worker-unavailable"
    title = "No worker available"


class WorkerCrashedError(ProblemError):
    status = 503
    type = "worker-crashed"
    title = "Worker crashed"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class TransformTimeoutError(ProblemError, TimeoutError):
    status = 504
    type = "transform-timeout"
    title = "Transform timed out"


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

    def __init__(self, message: str, *, limit_s: float) -> None:
        """``limit_s``: the time allowed that ran out (the connect timeout, or the attempt's own)."""
        super().__init__(message)
        self.limit_s = limit_s
        # Set when the gateway's own event loop stood still for much of that time (app/upstream/client.py): the
        # timeout then says nothing about the upstream, and is not held against it.
        self.stalled_s: float | None = None


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


class DependencyFailedError(SourceError):
    """Nothing was sent: a parent failed or was skipped, or the value referred to is missing, not a scalar, or
    unusable where it goes (a path segment '..', a header value with a control character, past a size limit)."""

    kind = "dependency_failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.attempts = 0


class TooManyItemsError(SourceError):
    kind = "too_many_items"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.attempts = 0


class DatabaseError(SourceError):
    kind = "db_error"


class DatabaseUnavailableError(DatabaseError):
    kind = "db_unavailable"


class QueryTimeoutError(DatabaseError):
    kind = "timeout"


class SourceOverloadedError(SourceError):
    kind = "overloaded"
