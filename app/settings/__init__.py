"""Settings: one validated object built from the config file and ``GATEWAY_*`` environment variables.

Environment variables win over the file. Nested keys use ``__``: ``GATEWAY_SERVER__PORT=9000`` overrides
``[server] port``; ``GATEWAY_DATABASE_URL`` sets ``database_url``. Nothing here is read at import time:
``load_settings()`` is called by the CLI and the result is passed down explicitly.

The section models live beside this module (``base``; ``sources``: upstreams, queries and composites;
``sections``: the gateway's own); this module holds the whole ``Settings`` and how it is loaded.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from app.aggregate import graph
from app.errors import ConfigError
from app.otel_env import otel_updates
from app.settings.base import Name
from app.settings.base import ParamType as ParamType
from app.settings.sections import (
    ApiKeyConfig as ApiKeyConfig,
)
from app.settings.sections import (
    AuthSettings as AuthSettings,
)
from app.settings.sections import (
    CacheSettings as CacheSettings,
)
from app.settings.sections import (
    ComputeSettings as ComputeSettings,
)
from app.settings.sections import (
    CorsSettings as CorsSettings,
)
from app.settings.sections import (
    DatabaseSettings as DatabaseSettings,
)
from app.settings.sections import (
    DiagnosticsSettings as DiagnosticsSettings,
)
from app.settings.sections import (
    HttpClientSettings as HttpClientSettings,
)
from app.settings.sections import (
    JwtAlgorithm as JwtAlgorithm,
)
from app.settings.sections import (
    JwtSettings as JwtSettings,
)
from app.settings.sections import (
    KeyRate as KeyRate,
)
from app.settings.sections import (
    LimitSettings as LimitSettings,
)
from app.settings.sections import (
    ObservabilitySettings as ObservabilitySettings,
)
from app.settings.sections import (
    RateLimitSettings as RateLimitSettings,
)
from app.settings.sections import (
    Scope as Scope,
)
from app.settings.sections import (
    ServerSettings as ServerSettings,
)
from app.settings.sections import (
    TracingSettings as TracingSettings,
)
from app.settings.sources import (
    BreakerPolicy as BreakerPolicy,
)
from app.settings.sources import (
    CompositeConfig as CompositeConfig,
)
from app.settings.sources import (
    CompositeSource as CompositeSource,
)
from app.settings.sources import (
    HealthCheck as HealthCheck,
)
from app.settings.sources import (
    OutlierPolicy as OutlierPolicy,
)
from app.settings.sources import (
    QueryConfig as QueryConfig,
)
from app.settings.sources import (
    RetryPolicy as RetryPolicy,
)
from app.settings.sources import (
    UpstreamCache as UpstreamCache,
)
from app.settings.sources import (
    UpstreamConfig as UpstreamConfig,
)
from app.settings.sources import (
    UpstreamTls as UpstreamTls,
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
    cache: CacheSettings = CacheSettings()
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
    def _composite_references_resolve(self) -> Settings:
        # The graph a composite's references make is the operator's: checked here, once, not per request.
        problems = []
        for cname, composite in self.composites.items():
            nodes: dict[str, graph.Node] = {}
            for sname, source in composite.sources.items():
                loc = f"sources.{sname}"
                texts = {"path": source.path or "", **{f"params.{k}": v for k, v in source.params.items()}}
                json = source.upstream is None or source.method != "HEAD"
                nodes[sname], found = graph.source_node(loc, texts, for_each=source.for_each, json=json)
                if source.max_items is not None and source.for_each is None:
                    found.append(graph.Problem(f"{loc}.max_items", "max_items goes with for_each", "bad_reference"))
                if source.max_items is not None and source.max_items > self.limits.max_sources:
                    found.append(graph.Problem(f"{loc}.max_items", "over limits.max_sources", "too_many_items"))
                problems += [f"composite '{cname}' {p.loc}: {p.msg}" for p in found]
            checked = graph.check(nodes, max_depth=self.limits.max_chain_depth)
            problems += [f"composite '{cname}' {p.loc}: {p.msg}" for p in checked.problems]
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
    def _shared_cache_has_redis(self) -> Settings:
        shared = sorted(n for n, up in self.upstreams.items() if up.cache.enabled and up.cache.backend == "redis")
        if shared and self.cache_redis_url is None:
            raise ValueError(
                "; ".join(
                    f"upstreams.{name}.cache.backend: 'redis' needs cache.redis_url (GATEWAY_CACHE__REDIS_URL) "
                    "or rate_limit.redis_url"
                    for name in shared
                )
            )
        return self

    @property
    def cache_redis_url(self) -> SecretStr | None:
        """The shared cache's Redis: its own, else the rate limiter's."""
        return self.cache.redis_url if self.cache.redis_url is not None else self.rate_limit.redis_url

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
