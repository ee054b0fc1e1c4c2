"""Settings of what the gateway calls: upstreams (retries, breaker, TLS, credentials), named queries and composites."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from app.headers import HEADER_NAME, HEADER_VALUE
from app.settings.base import Name, ParamType, PositiveMs, _Section

# Headers no allowlist can forward: they belong to the connection or are set by the gateway itself.
_NEVER_FORWARDED = frozenset(
    {
        "host",
        "connection",
        "content-length",
        "transfer-encoding",
        "te",
        "upgrade",
        "keep-alive",
        "proxy-authorization",
        "x-request-deadline-ms",
        "x-request-id",
        "traceparent",
    }
)
_SQL_PLACEHOLDER = re.compile(r"%\((\w+)\)s")
_TEMPLATE_FIELD = re.compile(r"\{(\w+)\}")
_REFERENCE = re.compile(r"\$\{[^{}]*\}")


class RetryPolicy(_Section):
    attempts: int = Field(3, ge=1, le=10, description="Tries in all, the first included.")
    backoff_initial_ms: PositiveMs = 25.0
    backoff_max_ms: PositiveMs = 1_000.0
    budget_ratio: float = Field(0.2, ge=0, le=1, description="Retries at most this fraction of calls.")
    budget_window_s: float = Field(10.0, gt=0, le=3600)
    budget_min_retries: int = Field(10, ge=0, description="Retries always allowed per window, for low traffic.")


class BreakerPolicy(_Section):
    consecutive_failures: int = Field(5, ge=1)
    failure_rate: float = Field(0.5, gt=0, le=1)
    min_calls: int = Field(20, ge=1, description="Calls in the window before the failure rate counts.")
    window_s: float = Field(10.0, gt=0, le=3600)
    open_ms: PositiveMs = 5_000.0
    half_open_probes: int = Field(1, ge=1, le=100)


class OutlierPolicy(_Section):
    """Passive outlier ejection of one endpoint of an upstream with several (app/upstream/ejection.py)."""

    consecutive_failures: int = Field(5, ge=1, description="Connect errors, timeouts or 5xx in a row that eject.")
    base_ejection_ms: PositiveMs = Field(30_000.0, description="First ejection; each repeat adds as much again.")
    max_ejection_ms: PositiveMs = 300_000.0
    max_ejection_percent: int = Field(50, ge=0, le=100, description="Endpoints ejected at once, at most.")


class HealthCheck(_Section):
    """Active checks of each endpoint, for endpoints that receive little traffic; off without a path."""

    path: str | None = Field(None, description="GET this path on every endpoint; a 2xx or 3xx is healthy.")
    interval_s: float = Field(5.0, gt=0, le=3600)
    timeout_ms: PositiveMs = 1_000.0

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/") or any(c in value for c in "?#\\ ")):
            raise ValueError("must be an absolute path, without query or fragment")
        return value


# Besides those never forwarded: set by the gateway on the calls that need it.
_GATEWAY_SET = frozenset({"content-type"})


class UpstreamTls(_Section):
    """How the gateway checks an https upstream, and proves itself to it (mutual TLS)."""

    ca_file: Path | None = Field(None, description="PEM CA bundle for the upstream's certificate; default: system.")
    client_cert_file: Path | None = Field(None, description="PEM certificate (chain) presented to the upstream.")
    client_key_file: Path | None = Field(None, description="PEM private key of client_cert_file.")
    client_key_password: SecretStr | None = Field(None, description="For an encrypted client_key_file.")

    @field_validator("ca_file", "client_cert_file", "client_key_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @model_validator(mode="after")
    def _cert_with_key(self) -> UpstreamTls:
        if (self.client_cert_file is None) != (self.client_key_file is None):
            raise ValueError("client_cert_file and client_key_file go together")
        if self.client_key_password is not None and self.client_key_file is None:
            raise ValueError("client_key_password needs client_key_file")
        return self

    @property
    def configured(self) -> bool:
        return any(f is not None for f in (self.ca_file, self.client_cert_file, self.client_key_file))


MAX_ENDPOINTS = 256


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port


class UpstreamCache(_Section):
    """``[upstreams.X.cache]``: a shared HTTP cache (RFC 9111) of this upstream's answers, and single-flight
    coalescing of identical concurrent calls (app/upstream/cache/)."""

    enabled: bool = Field(False, description="Store answers and serve them while fresh.")
    coalesce: bool | None = Field(
        None, description="Identical concurrent GET/HEAD calls share one upstream call (default: as enabled)."
    )
    default_ttl_s: float = Field(
        0.0, ge=0, le=86_400, description="Freshness when the upstream gives none (0: only what it marks)."
    )
    max_bytes: int = Field(64 * 1024 * 1024, ge=1, le=2**40, description="Bytes held, least recently used out.")
    stale_if_error_s: float = Field(
        0.0, ge=0, le=86_400, description="Serve an expired answer this long past expiry while the upstream fails."
    )
    backend: Literal["memory", "redis"] = Field("memory", description="redis: entries shared by every replica.")

    @property
    def coalescing(self) -> bool:
        return self.enabled if self.coalesce is None else self.coalesce

    @property
    def active(self) -> bool:
        return self.enabled or self.coalescing


class UpstreamConfig(_Section):
    # Required unless `endpoints` are given (then it defaults to the first of them). Beside `endpoints`, it names
    # the service: its path prefix, and its host name (sent as Host, and checked in the TLS handshake).
    base_url: str = ""
    endpoints: list[str] = Field(
        default_factory=list, max_length=MAX_ENDPOINTS, description="Origins to balance requests across."
    )
    dns_refresh_s: float | None = Field(
        None, gt=0, le=3600, description="Resolve each host to all its addresses, again every this many seconds."
    )
    policy: Literal["p2c", "round_robin"] = "p2c"
    outlier: OutlierPolicy = OutlierPolicy()
    health_check: HealthCheck = HealthCheck()
    max_concurrency: int = Field(32, ge=1, le=10_000)
    timeout_ms: PositiveMs = 1_000.0
    connect_timeout_ms: PositiveMs = 250.0
    max_response_bytes: int = Field(8 * 1024 * 1024, ge=1)
    forward_headers: list[str] = Field(default_factory=list, description="Client headers passed through.")
    # The gateway's own credentials for this upstream (an API key, a bearer token): sent on every call, never
    # logged, never shown; a client can neither see nor replace them.
    headers: dict[str, SecretStr] = Field(default_factory=dict, description="Sent on every call to this upstream.")
    tls: UpstreamTls = UpstreamTls()
    retry: RetryPolicy = RetryPolicy()
    breaker: BreakerPolicy = BreakerPolicy()
    cache: UpstreamCache = UpstreamCache()

    @field_validator("base_url")
    @classmethod
    def _http_base_url(cls, value: str) -> str:
        if value == "":
            return value  # checked with `endpoints`, below
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http:// or https:// URL")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("must not carry a query, fragment or credentials")
        return value.rstrip("/")

    @field_validator("endpoints")
    @classmethod
    def _http_origins(cls, value: list[str]) -> list[str]:
        seen: set[tuple[str, str, int]] = set()
        for url in value:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{url!r} is not an absolute http:// or https:// URL")
            if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
                raise ValueError(f"{url!r} must be an origin only (scheme, host, port): the path goes in base_url")
            if _origin(url) in seen:
                raise ValueError(f"{url!r} is given twice")
            seen.add(_origin(url))
        if len({_origin(url)[0] for url in value}) > 1:
            raise ValueError("endpoints must all use the same scheme")
        return [url.rstrip("/") for url in value]

    @field_validator("forward_headers")
    @classmethod
    def _lower_headers(cls, value: list[str]) -> list[str]:
        invalid = [h for h in value if not HEADER_NAME.fullmatch(h)]
        if invalid:
            raise ValueError(f"not valid header names: {', '.join(map(repr, invalid))}")
        lowered = [h.lower() for h in value]
        hop = sorted(set(lowered) & _NEVER_FORWARDED)
        if hop:
            raise ValueError(f"these headers can never be forwarded: {', '.join(hop)}")
        return lowered

    @field_validator("headers")
    @classmethod
    def _valid_headers(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        # Names are case-insensitive: kept lower-case, so that one given twice (say, in the file and again in the
        # environment, whose keys arrive lower-case) is refused instead of sent twice.
        lowered: dict[str, SecretStr] = {}
        for name, secret in value.items():
            if not HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid header name")
            key = name.lower()
            if key in _NEVER_FORWARDED or key in _GATEWAY_SET:
                raise ValueError(f"the gateway sets {name} itself")
            if key in lowered:
                raise ValueError(f"{key} is given twice (header names are case-insensitive)")
            if not HEADER_VALUE.fullmatch(secret.get_secret_value()):
                raise ValueError(f"the value of {name} holds a control character (a trailing newline?)")
            lowered[key] = secret
        return lowered

    @model_validator(mode="after")
    def _consistent(self) -> UpstreamConfig:
        if not self.base_url:
            if not self.endpoints:
                raise ValueError("either base_url or endpoints is required")
            # The frozen model's one derived value, set once while it is validated: everything that joins paths
            # reads base_url, whichever way the upstream was given.
            object.__setattr__(self, "base_url", self.endpoints[0])
        elif self.endpoints and _origin(self.endpoints[0])[0] != urlsplit(self.base_url).scheme:
            raise ValueError("endpoints must use base_url's scheme")
        both = sorted(set(self.headers) & set(self.forward_headers))
        if both:
            raise ValueError(f"headers both set by the gateway and forwarded from clients: {', '.join(both)}")
        if self.tls.configured and urlsplit(self.base_url).scheme != "https":
            raise ValueError("tls settings need an https:// base_url")
        return self

    @property
    def balanced(self) -> bool:
        """Whether calls are balanced across endpoints: decided once, at start-up. One fixed endpoint that is the
        base URL's own origin goes the plain way, as a single base_url always has."""
        if self.dns_refresh_s is not None or len(self.endpoints) > 1:
            return True
        return bool(self.endpoints) and _origin(self.endpoints[0]) != _origin(self.base_url)


class QueryConfig(_Section):
    sql: str = Field(min_length=1)
    params: dict[Name, ParamType] = Field(default_factory=dict)
    timeout_ms: PositiveMs = 2_000.0
    max_rows: int = Field(1_000, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _placeholders_match_params(self) -> QueryConfig:
        used = set(_SQL_PLACEHOLDER.findall(self.sql))
        declared = set(self.params)
        if used - declared:
            raise ValueError(f"sql uses undeclared parameters: {', '.join(sorted(used - declared))}")
        if declared - used:
            raise ValueError(f"params declared but unused in sql: {', '.join(sorted(declared - used))}")
        return self


class CompositeSource(_Section):
    upstream: Name | None = None
    path: str | None = None
    method: Literal["GET", "HEAD"] = "GET"
    query: Name | None = None
    params: dict[str, str] = Field(default_factory=dict, description="Templates such as '{user_id}'.")
    required: bool = False
    fields: list[str] | None = None
    for_each: str | None = Field(None, description="'${orders.data[*].id}': one call per element (README).")
    max_items: int | None = Field(None, ge=1, le=1000, description="Elements for_each takes; default max_sources.")

    @model_validator(mode="after")
    def _one_kind(self) -> CompositeSource:
        if (self.upstream is None) == (self.query is None):
            raise ValueError("a source names exactly one of 'upstream' or 'query'")
        if self.upstream is not None and (self.path is None or not self.path.startswith("/")):
            raise ValueError("an upstream source needs a 'path' starting with '/'")
        if self.query is not None and self.path is not None:
            raise ValueError("a query source takes no 'path'")
        return self

    def template_fields(self) -> set[str]:
        # References to other sources (${profile.data.id}) are no placeholders: the settings check those apart.
        texts = [_REFERENCE.sub("", self.path or ""), *(_REFERENCE.sub("", v) for v in self.params.values())]
        return {name for text in texts for name in _TEMPLATE_FIELD.findall(text)}


class CompositeConfig(_Section):
    params: dict[Name, ParamType] = Field(default_factory=dict)
    sources: dict[Name, CompositeSource] = Field(min_length=1)
    merge: Literal["grouped", "flat"] = "grouped"
    deadline_ms: PositiveMs | None = None

    @model_validator(mode="after")
    def _templates_declared(self) -> CompositeConfig:
        for name, source in self.sources.items():
            missing = source.template_fields() - set(self.params)
            if missing:
                raise ValueError(f"source '{name}' uses undeclared params: {', '.join(sorted(missing))}")
        return self
