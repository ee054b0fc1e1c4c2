"""Settings sections of the gateway itself: server, limits, HTTP client, database, compute, auth, rate limits, CORS,
observability and diagnostics."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from app.settings.base import Name, PositiveMs, _Section
from app.sizing import default_cpu_workers, default_io_threads


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
    # When the collector looks for reference cycles once the gateway is ready (app/lifecycle/heap.py): every this
    # many seconds, by the loop's clock. Python's own trigger counts allocations, which under load means a young
    # collection every few requests that finds nothing (about 130 us of CPU per request at N = 8). 0: Python's
    # trigger, with gc_thresholds.
    gc_interval_s: float = Field(
        1.0, ge=0, le=60, description="Collect on a clock every this many seconds once ready; 0: by count."
    )
    # The count trigger's thresholds, used when gc_interval_s is 0. Python's default (700, 10, 10) spent 15-19 %
    # of the loop's CPU on collections in a fan-out benchmark; (5000, 20, 20) about 3 %.
    gc_thresholds: tuple[Annotated[int, Field(ge=1, le=1_000_000)], ...] = Field(
        (5000, 20, 20), min_length=3, max_length=3, description="gc.set_threshold() once ready."
    )


class LimitSettings(_Section):
    max_sources: int = Field(16, ge=1, le=1000, description="Sources per aggregate, and calls (for_each included).")
    max_chain_depth: int = Field(4, ge=1, le=32, description="Sources in the longest chain of references.")
    max_reference_bytes: int = Field(
        4096, ge=1, le=1024 * 1024, description="A value a reference substitutes, at most (UTF-8 bytes)."
    )
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


class CacheSettings(_Section):
    """``[cache]``: where upstreams with ``cache.backend = "redis"`` keep their entries, shared by every replica."""

    redis_url: SecretStr | None = Field(
        None, description="redis://host:6379/0 (GATEWAY_CACHE__REDIS_URL); default: rate_limit.redis_url."
    )
    redis_prefix: str = Field("gateway:cache:", min_length=1, max_length=128)
    redis_timeout_ms: PositiveMs = Field(
        50.0, description="Per command; past it the lookup is a miss, and the source never fails for it."
    )


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
    # One series per endpoint of every balanced upstream: off by default, so a large fleet cannot blow up the
    # number of series (the per-upstream counts by state are always there).
    endpoint_metrics: bool = Field(False, description="Export in-flight, calls, failures and ejections per endpoint.")
    tracing: TracingSettings = TracingSettings()


class DiagnosticsSettings(_Section):
    dump_signal: bool = Field(True, description="SIGUSR1 dumps every thread's stack and every task to the log.")
    tracemalloc_frames: int = Field(0, ge=0, le=64, description="Trace allocations with this many frames; 0: off.")
    task_census_interval_s: float = Field(
        1.0, gt=0, le=60, description="How often tasks are counted for /debug/tasks; each age is within this."
    )
