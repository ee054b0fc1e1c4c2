"""Settings: one validated object built from the config file and ``GATEWAY_*`` environment variables.

Environment variables win over the file. Nested keys use ``__``: ``GATEWAY_SERVER__PORT=9000`` overrides
``[server] port``; ``GATEWAY_DATABASE_URL`` sets ``database_url``. Nothing here is read at import time:
``load_settings()`` is called by the CLI and the result is passed down explicitly.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from app.errors import ConfigError
from app.headers import HEADER_NAME, HEADER_VALUE
from app.otel_env import otel_updates
from app.sizing import default_cpu_workers, default_io_threads

Name = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")]
ParamType = Literal["int", "float", "str", "bool"]
PositiveMs = Annotated[float, Field(gt=0, le=3_600_000)]

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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class UpstreamConfig(_Section):
    base_url: str
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

    @field_validator("base_url")
    @classmethod
    def _http_base_url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http:// or https:// URL")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("must not carry a query, fragment or credentials")
        return value.rstrip("/")

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
        both = sorted(set(self.headers) & set(self.forward_headers))
        if both:
            raise ValueError(f"headers both set by the gateway and forwarded from clients: {', '.join(both)}")
        if self.tls.configured and urlsplit(self.base_url).scheme != "https":
            raise ValueError("tls settings need an https:// base_url")
        return self


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
        texts = [self.path or "", *self.params.values()]
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


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    # Longer than the idle timeout of the load balancers usually in front (AWS ALB: 60 s), so that they, not
    # the gateway, close idle connections: a gateway closing first races a request the proxy just sent.
    keepalive_timeout_s: float = Field(75.0, gt=0, le=3600)
    drain_delay_s: float = Field(5.0, ge=0, le=600)
    drain_timeout_s: float = Field(20.0, ge=0, le=3600)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    docs: bool = Field(True, description="Serve /docs (Swagger UI) and /redoc (ReDoc), assets included, no CDN.")
    # uvloop is faster on most workloads; "asyncio" is the standard library's loop, for platforms without
    # uvloop and for measuring what uvloop buys (see docs/benchmarks.md).
    loop: Literal["uvloop", "asyncio"] = "uvloop"
    # The collector's thresholds once the gateway is ready (app/lifecycle/heap.py). Python's default (700, 10, 10)
    # spent 15-19 % of the loop's CPU on collections in a fan-out benchmark; (5000, 20, 20) about 3 %, with young
    # collections of under 5 ms.
    gc_thresholds: tuple[Annotated[int, Field(ge=1, le=1_000_000)], ...] = Field(
        (5000, 20, 20), min_length=3, max_length=3, description="gc.set_threshold() once ready."
    )


class LimitSettings(_Section):
    max_sources: int = Field(16, ge=1, le=1000)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    default_deadline_ms: PositiveMs = 1_000.0
    max_deadline_ms: PositiveMs = 10_000.0
    # Everything else a client controls is bounded too, each limit answered with its own problem type.
    max_headers: int = Field(100, ge=8, le=10_000, description="Request header fields, at most (431).")
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1024 * 1024, description="Names and values (431).")
    max_url_bytes: int = Field(8 * 1024, ge=256, le=1024 * 1024, description="Path plus query string (414).")
    max_query_params: int = Field(64, ge=1, le=10_000, description="Query-string parameters (400).")
    # orjson refuses to encode past 255 levels; an aggregate wraps a client's JSON in a few levels of its own.
    max_json_depth: int = Field(32, ge=2, le=200, description="Nesting of a JSON request body (400).")
    request_head_timeout_s: float = Field(10.0, gt=0, le=600, description="To receive a whole head (408).")
    # Connections the kernel holds for the gateway to accept. The event loop accepts a whole queue in one turn, so a
    # long queue is a long stall in a burst (on 2 cores, a queue of 1,024 stalled it for up to 300 ms; of 128, for
    # well under 100 ms); past it the kernel has clients retry their SYN a second later.
    listen_backlog: int = Field(128, ge=16, le=65535, description="Pending connections, at most.")
    max_in_flight_requests: int = Field(512, ge=1, le=1_000_000, description="Beyond it: 503 at once.")
    # The in-flight limit follows the event loop's lag between these bounds (app/security/admission.py).
    shed_loop_lag_ms: float = Field(
        0.0, ge=0, le=10_000, description="Loop lag over which the in-flight limit is lowered (e.g. 20); 0: fixed."
    )
    min_in_flight_requests: int = Field(8, ge=1, le=1_000_000, description="The lowered limit's floor.")
    shed_retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After of a shed request.")

    @model_validator(mode="after")
    def _floor_under_ceiling(self) -> LimitSettings:
        if self.shed_loop_lag_ms > 0 and self.min_in_flight_requests > self.max_in_flight_requests:
            raise ValueError("min_in_flight_requests exceeds max_in_flight_requests")
        return self


class HttpClientSettings(_Section):
    max_connections: int = Field(256, ge=1, le=100_000, description="All upstreams together.")
    max_in_flight: int = Field(256, ge=1, le=100_000, description="Global limit on upstream calls.")


class DatabaseSettings(_Section):
    executor_threads: int = Field(default_factory=default_io_threads, ge=1, le=1024)
    queue_limit: int = Field(64, ge=0, le=100_000, description="Queries waiting for a thread, at most.")
    min_connections: int = Field(2, ge=0)
    connect_timeout_s: float = Field(3.0, gt=0, le=60)
    statement_timeout_ms: PositiveMs = 5_000.0
    startup_check: bool = Field(True, description="Refuse to start when the database cannot be reached.")

    @model_validator(mode="after")
    def _min_within_pool(self) -> DatabaseSettings:
        if self.min_connections > self.executor_threads:
            raise ValueError("min_connections must not exceed executor_threads (the pool size)")
        return self


class ComputeSettings(_Section):
    enabled: bool = Field(True, description="Off for an aggregation-only gateway: no worker processes at all.")
    workers: int = Field(default_factory=default_cpu_workers, ge=1, le=256)
    queue_limit: int = Field(16, ge=0, le=10_000, description="Jobs waiting for a worker, at most.")
    start_method: Literal["spawn", "forkserver"] = "forkserver"
    max_tasks_per_child: int = Field(1_000, ge=0, description="Recycle a worker after this many jobs; 0: never.")
    job_timeout_s: float = Field(30.0, gt=0, le=3600)
    queue_timeout_s: float = Field(10.0, gt=0, le=3600, description="A job waiting longer for a worker gets 503.")
    # A request holds its place in the pool while its body arrives: a client that trickles it must not keep it.
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description="Reading and checking a body, at most; then 408.")
    max_body_bytes: int = Field(128 * 1024 * 1024, ge=1024, description="Transform request bodies, at most.")
    max_elements: int = Field(16 * 1024 * 1024, ge=1, description="Elements per request; a transform may cap lower.")
    shm_threshold_bytes: int = Field(
        1024 * 1024, ge=1, description="Arrays and answers of this size or more travel through shared memory."
    )
    # Segment names carry it (with the owner's pid), so start-up can remove what a crashed instance left behind.
    shm_prefix: str = Field("gw", pattern=r"^[A-Za-z][A-Za-z0-9]{0,15}$")
    load_plugins: bool = Field(True, description="Load transforms from the 'gateway.transforms' entry-point group.")


Scope = Literal["aggregate", "transform", "metrics", "admin"]
_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_ORIGIN = re.compile(r"^https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


class KeyRate(_Section):
    rate_per_s: float = Field(gt=0, le=1_000_000)
    burst: int = Field(ge=1, le=10_000_000)


class ApiKeyConfig(_Section):
    """One API key: only its hash is configured (`gateway hash-key` prints it)."""

    name: Name
    hash: str = Field(description="sha256:<64 hex digits> of the key.")
    scopes: list[Scope] = Field(min_length=1)
    # None: no restriction; a list (possibly empty) allows exactly those names.
    upstreams: list[Name] | None = None
    queries: list[Name] | None = None
    composites: list[Name] | None = None
    rate: KeyRate | None = Field(None, description="This key's own token bucket; default: [rate_limit].")

    @field_validator("hash")
    @classmethod
    def _sha256_hex(cls, value: str) -> str:
        value = value.strip().lower()
        if not _KEY_HASH.match(value):
            raise ValueError("must be 'sha256:' and 64 hex digits, as printed by `gateway hash-key`")
        return value


JwtAlgorithm = Literal["RS256", "ES256", "EdDSA"]
_JWT_ALGORITHMS: tuple[JwtAlgorithm, ...] = ("RS256", "ES256", "EdDSA")


class JwtSettings(_Section):
    """Bearer JWTs from one identity provider, next to API keys (app/security/jwt.py)."""

    jwks_url: str | None = Field(None, description="https (http only on a loopback address); or public_key_files.")
    public_key_files: list[Path] | None = Field(None, min_length=1, max_length=16, description="PEM public keys.")
    issuer: str = Field(min_length=1, description="The `iss` every token must carry.")
    audience: str = Field(min_length=1, description="The `aud` every token must carry (one of, for a list).")
    # Asymmetric only: an HMAC algorithm would make the public key a shared secret, and `none` no signature.
    algorithms: list[JwtAlgorithm] = Field(default_factory=lambda: list(_JWT_ALGORITHMS), min_length=1)
    scopes_claim: str = Field("scope", min_length=1, max_length=64, description="scope, scp or a custom claim.")
    leeway_s: float = Field(30.0, ge=0, le=300, description="Clock skew allowed on exp, nbf and iat.")
    # Every token holder's allowlists and rate, as for an API key; None: no restriction, [rate_limit] defaults.
    upstreams: list[Name] | None = None
    queries: list[Name] | None = None
    composites: list[Name] | None = None
    rate: KeyRate | None = Field(None, description="Each subject's own token bucket; default: [rate_limit].")
    refresh_interval_s: float = Field(300.0, ge=10, le=86_400, description="JWKS fetched again this often.")
    min_refresh_interval_s: float = Field(
        10.0, ge=1, le=3600, description="An unknown kid fetches the JWKS at most once per this interval."
    )
    fetch_timeout_s: float = Field(5.0, gt=0, le=60, description="One JWKS request, at most.")
    token_cache_size: int = Field(4096, ge=0, le=1_000_000, description="Verified tokens remembered; 0: none.")
    max_token_bytes: int = Field(8192, ge=512, le=65_536, description="Longer bearer tokens are refused unread.")

    @field_validator("jwks_url")
    @classmethod
    def _https_unless_loopback(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute https:// URL")
        if parts.username or parts.password or parts.fragment:
            raise ValueError("must not carry credentials or a fragment")
        if parts.scheme == "http" and not _loopback(parts.hostname):
            raise ValueError("must be https:// (plain http only on a loopback address): keys must not be spoofable")
        return value

    @field_validator("public_key_files")
    @classmethod
    def _readable(cls, value: list[Path] | None) -> list[Path] | None:
        for path in value or ():
            if not path.is_file():
                raise ValueError(f"no such file: {path}")
        return value

    @field_validator("algorithms", mode="before")
    @classmethod
    def _asymmetric(cls, value: Any) -> Any:
        if isinstance(value, list):
            bad = [str(a) for a in value if a not in _JWT_ALGORITHMS]
            if bad:
                raise ValueError(f"only {', '.join(_JWT_ALGORITHMS)} are accepted, not {', '.join(bad)}")
            return list(dict.fromkeys(value))
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtSettings:
        if (self.jwks_url is None) == (self.public_key_files is None):
            raise ValueError("give exactly one of jwks_url or public_key_files")
        return self


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AuthSettings(_Section):
    # On unless switched off in so many words: a gateway on the boundary must not start open by accident.
    enabled: bool = Field(True, description="false only explicitly: every client may then call every route.")
    keys: list[ApiKeyConfig] = Field(default_factory=list, max_length=10_000)
    jwt: JwtSettings | None = Field(None, description="Bearer JWTs, next to (or instead of) API keys.")

    @model_validator(mode="after")
    def _unique(self) -> AuthSettings:
        names = [k.name for k in self.keys]
        if len(names) != len(set(names)):
            raise ValueError("key names must be unique")
        hashes = [k.hash for k in self.keys]
        if len(hashes) != len(set(hashes)):
            raise ValueError("two keys have the same hash")
        return self


class RateLimitSettings(_Section):
    enabled: bool = True
    rate_per_s: float = Field(50.0, gt=0, le=1_000_000, description="Tokens added per second, per key.")
    burst: int = Field(100, ge=1, le=10_000_000, description="Bucket size: requests allowed at once.")
    backend: Literal["memory", "redis"] = Field("memory", description="redis: one limit shared by all replicas.")
    redis_url: SecretStr | None = Field(None, description="redis://host:6379/0 (GATEWAY_RATE_LIMIT__REDIS_URL).")
    redis_prefix: str = Field("gateway:ratelimit:", min_length=1, max_length=128)
    redis_timeout_ms: PositiveMs = Field(100.0, description="Per command; past it the failure mode applies.")
    failure_mode: Literal["allow", "deny"] = Field(
        "allow", description="When the shared backend fails: let requests through, or answer 503."
    )

    @model_validator(mode="after")
    def _redis_needs_url(self) -> RateLimitSettings:
        if self.backend == "redis" and self.redis_url is None:
            raise ValueError("backend 'redis' needs redis_url (or GATEWAY_RATE_LIMIT__REDIS_URL)")
        return self


class CorsSettings(_Section):
    """Off unless origins are listed; a JSON API called by servers needs none."""

    allow_origins: list[str] = Field(default_factory=list, description="Exact origins; '*' is refused.")
    allow_credentials: bool = False
    max_age_s: int = Field(600, ge=0, le=86_400)

    @field_validator("allow_origins")
    @classmethod
    def _explicit_origins(cls, value: list[str]) -> list[str]:
        bad = [o for o in value if not _ORIGIN.match(o)]
        if bad:
            raise ValueError(f"origins must be scheme://host[:port] with no path, and never '*': {', '.join(bad)}")
        return value


class TracingSettings(_Section):
    # Each key left unset here (file and GATEWAY_*) takes the standard OTEL_* variable's value (otel_env.py).
    enabled: bool = Field(False, description="OpenTelemetry spans; on by default when an OTLP endpoint is set.")
    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces endpoint, e.g. http://collector:4318/v1/traces"
    )
    service_name: str = "gateway"
    sample_ratio: float = Field(1.0, ge=0, le=1)
    parent_based: bool = Field(True, description="Follow the caller's sampling decision when it sent one.")
    resource_attributes: dict[str, str] = Field(default_factory=dict, description="On every span's resource.")


class ObservabilitySettings(_Section):
    admin_host: str | None = Field(None, description="Admin listener address; default: server.host.")
    admin_port: int | None = Field(None, ge=0, le=65535, description="Serve /metrics and /debug here, not publicly.")
    blocking_threshold_ms: PositiveMs = 100.0
    loop_lag_interval_ms: PositiveMs = 100.0
    access_log: bool = True
    tracing: TracingSettings = TracingSettings()


class DiagnosticsSettings(_Section):
    dump_signal: bool = Field(True, description="SIGUSR1 dumps every thread's stack and every task to the log.")
    tracemalloc_frames: int = Field(0, ge=0, le=64, description="Trace allocations with this many frames; 0: off.")
    task_census_interval_s: float = Field(
        1.0, gt=0, le=60, description="How often tasks are counted for /debug/tasks; each age is within this."
    )


class Settings(BaseSettings):
    """The whole validated configuration of one gateway process."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_nested_delimiter="__", extra="forbid")

    database_url: SecretStr | None = None
    server: ServerSettings = ServerSettings()
    limits: LimitSettings = LimitSettings()
    http: HttpClientSettings = HttpClientSettings()
    database: DatabaseSettings = DatabaseSettings()
    compute: ComputeSettings = ComputeSettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    diagnostics: DiagnosticsSettings = DiagnosticsSettings()
    auth: AuthSettings = AuthSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    cors: CorsSettings = CorsSettings()
    upstreams: dict[Name, UpstreamConfig] = Field(default_factory=dict)
    queries: dict[Name, QueryConfig] = Field(default_factory=dict)
    composites: dict[Name, CompositeConfig] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Explicit construction reads nothing else; load_settings() merges the file and the environment itself.
        return (init_settings,)

    @model_validator(mode="after")
    def _references_resolve(self) -> Settings:
        problems: list[str] = []
        if self.queries and self.database_url is None:
            problems.append("queries are configured but database_url (GATEWAY_DATABASE_URL) is not set")
        for cname, composite in self.composites.items():
            for sname, source in composite.sources.items():
                if source.upstream is not None and source.upstream not in self.upstreams:
                    problems.append(f"composite '{cname}' source '{sname}': unknown upstream '{source.upstream}'")
                if source.query is not None:
                    query = self.queries.get(source.query)
                    if query is None:
                        problems.append(f"composite '{cname}' source '{sname}': unknown query '{source.query}'")
                    elif set(query.params) - set(source.params):
                        missing = ", ".join(sorted(set(query.params) - set(source.params)))
                        problems.append(f"composite '{cname}' source '{sname}': missing query params {missing}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _limits_fit_the_connector(self) -> Settings:
        # A semaphore larger than the connector's limit would let calls queue inside aiohttp, where the wait counts
        # against the upstream's timeout and looks like a slow upstream.
        problems = []
        if self.http.max_in_flight > self.http.max_connections:
            problems.append("http.max_in_flight must not exceed http.max_connections")
        for name, up in self.upstreams.items():
            if up.max_concurrency > self.http.max_connections:
                problems.append(f"upstreams.{name}.max_concurrency must not exceed http.max_connections")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _key_allowlists_resolve(self) -> Settings:
        # A misspelt name in an allowlist would lock a client out silently: refuse it at start-up instead.
        problems = []
        grants: list[tuple[str, ApiKeyConfig | JwtSettings]] = [(f"auth key '{k.name}'", k) for k in self.auth.keys]
        if self.auth.jwt is not None:
            grants.append(("auth.jwt", self.auth.jwt))
        for who, grant in grants:
            for kind, known in (
                ("upstreams", self.upstreams),
                ("queries", self.queries),
                ("composites", self.composites),
            ):
                unknown = sorted(set(getattr(grant, kind) or ()) - set(known))
                if unknown:
                    problems.append(f"{who}: unknown {kind}: {', '.join(unknown)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def db_pool_size(self) -> int:
        # One connection per executor thread: psycopg2's pool never waits, so this makes PoolError impossible.
        return self.database.executor_threads


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _lower_header_names(data: dict[str, Any]) -> dict[str, Any]:
    """Upstream header names in lower case, so that a variable overrides the file's value whatever the file's
    spelling (variable names arrive lower-case). A name spelt twice in one source is left for validation."""
    upstreams = data.get("upstreams")
    if not isinstance(upstreams, dict):
        return data
    for upstream in upstreams.values():
        headers = upstream.get("headers") if isinstance(upstream, dict) else None
        if isinstance(headers, dict):
            lowered = {str(name).lower(): value for name, value in headers.items()}
            if len(lowered) == len(headers):
                upstream["headers"] = lowered
    return data


def _format_error(err: dict[str, Any], env_vars: dict[tuple[str, ...], str] | None = None) -> str:
    loc = ".".join(str(part) for part in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    # A value from the environment is named by its variable: that is where the operator must look, not the file.
    path, env_vars = tuple(str(part).lower() for part in err["loc"]), env_vars or {}
    var = next((env_vars[path[:n]] for n in range(len(path), 0, -1) if path[:n] in env_vars), None)
    if var is not None:
        return f"{var} ({loc}): {msg}"
    return f"{loc}: {msg}" if loc else msg


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _gateway_variables(environ: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Each GATEWAY_* variable by the key path it sets (``("server", "port")`` for GATEWAY_SERVER__PORT)."""
    return {
        tuple(name[len("GATEWAY_") :].lower().split("__")): name
        for name in environ
        if name.upper().startswith("GATEWAY_")
    }


def load_settings(path: Path | None = None, *, environ: bool = True) -> Settings:
    """Read the config file (TOML), overlay ``GATEWAY_*`` variables, and validate everything at once.

    Raises ConfigError listing one message per problem, each naming its key path.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start})"]) from exc
    if environ:
        try:
            env = EnvSettingsSource(Settings, env_prefix="GATEWAY_", env_nested_delimiter="__", case_sensitive=False)()
        except SettingsError as exc:
            # A variable holding a list or table must be JSON; the message names the variable, never the value.
            field = re.search(r'field "(\w+)"', str(exc))
            names = [
                name
                for path, name in _gateway_variables(os.environ).items()
                if field and path[0] == field.group(1) and not _is_json(os.environ[name])
            ]
            what = " or ".join(sorted(names)) if names else "environment"
            raise ConfigError([f"{what}: not valid JSON (a list or table must be JSON)"]) from exc
        data = _deep_merge(_lower_header_names(data), _lower_header_names(env))
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        env_vars = _gateway_variables(os.environ) if environ else None
        raise ConfigError([_format_error(dict(e), env_vars) for e in exc.errors()]) from exc
    if environ:
        settings = with_otel_environment(settings, os.environ)
    return settings


def with_otel_environment(settings: Settings, environ: Mapping[str, str]) -> Settings:
    """``settings`` with the OTEL_* variables applied where the tracing settings are unset (otel_env.py).

    Raises ConfigError naming each variable whose value cannot be used."""
    tracing = settings.observability.tracing
    update = otel_updates(tracing, environ)
    if not update:
        return settings
    merged = TracingSettings.model_validate({**tracing.model_dump(exclude_unset=True), **update})
    observability = settings.observability.model_copy(update={"tracing": merged})
    return settings.model_copy(update={"observability": observability})
