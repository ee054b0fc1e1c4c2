"""Plan an aggregate (validate every source against the config) and run it: concurrent, deadline-bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson
from starlette.types import Scope

from app.aggregate.models import AggregateRequest, QuerySourceSpec, SourceResult, UpstreamSourceSpec
from app.compute.jsonwork import digest_in_pool
from app.compute.pool import CpuPool
from app.db.pool import Database
from app.db.queries import bind, coerce
from app.errors import (
    BadResponseError,
    DatabaseUnavailableError,
    DeadlineExceededError,
    NotFoundError,
    OverloadedError,
    ProblemError,
    ResourceClosedError,
    SourceError,
    TooManySourcesError,
    ValidationFailedError,
)
from app.observability.tracing import Tracing, record_outcome
from app.settings import CompositeConfig, CompositeSource, QueryConfig, Settings
from app.upstream.call import decode_body
from app.upstream.client import Outbound, Progress, Result, UpstreamClient
from app.upstream.paths import UnsafePathError, confine_path, join_url
from app.worker.jsondigest import select


@dataclass(frozen=True)
class UpstreamPlan:
    upstream: str
    out: Outbound
    fields: tuple[str, ...] | None = None
    required: bool = False


@dataclass(frozen=True)
class QueryPlan:
    query: str
    config: QueryConfig
    params: dict[str, Any]
    fields: tuple[str, ...] | None = None
    required: bool = False


Plan = UpstreamPlan | QueryPlan


class _Problems:
    def __init__(self) -> None:
        self.errors: list[dict[str, Any]] = []

    def add(self, loc: str, msg: str, type_: str) -> None:
        self.errors.append({"loc": loc, "msg": msg, "type": type_})

    def raise_if_any(self, what: str) -> None:
        if self.errors:
            raise ValidationFailedError(f"{len(self.errors)} problem(s) in the {what}", errors=self.errors)


def _plan_upstream(settings: Settings, loc: str, spec: UpstreamSourceSpec, problems: _Problems) -> UpstreamPlan | None:
    upstream = settings.upstreams.get(spec.upstream)
    if upstream is None:
        problems.add(f"{loc}.upstream", f"unknown upstream '{spec.upstream}'", "unknown_upstream")
        return None
    try:
        url = join_url(upstream.base_url, confine_path(spec.path))
    except (UnsafePathError, UnicodeDecodeError) as exc:
        problems.add(f"{loc}.path", str(exc), "unsafe_path")
        return None
    refused = sorted(h for h in spec.headers if h.lower() not in upstream.forward_headers)
    if refused:
        problems.add(
            f"{loc}.headers", f"headers not allowed for this upstream: {', '.join(refused)}", "header_not_allowed"
        )
        return None
    params = {k: _text(v) for k, v in spec.params.items()}
    return UpstreamPlan(spec.upstream, Outbound(spec.method, url, params, spec.body, dict(spec.headers)))


def plan_request(settings: Settings, request: AggregateRequest) -> dict[str, Plan]:
    """Resolve every source against the config. Raises ValidationFailedError naming each problem."""
    limit = settings.limits.max_sources
    if len(request.sources) > limit:
        msg = f"at most {limit} sources per request"
        raise TooManySourcesError(msg, errors=[{"loc": "sources", "msg": msg, "type": "too_many_sources"}])
    problems = _Problems()
    plans: dict[str, Plan] = {}
    for name, spec in request.sources.items():
        loc = f"sources.{name}"
        plan: Plan | None
        if isinstance(spec, UpstreamSourceSpec):
            plan = _plan_upstream(settings, loc, spec, problems)
        else:
            plan = _plan_query(settings, loc, spec, problems)
        if plan is not None:
            plans[name] = plan
    problems.raise_if_any("aggregate request")
    return plans


def _plan_query(settings: Settings, loc: str, spec: QuerySourceSpec, problems: _Problems) -> QueryPlan | None:
    query = settings.queries.get(spec.query)
    if query is None:
        problems.add(f"{loc}.query", f"unknown query '{spec.query}'", "unknown_query")
        return None
    bound, errors = bind(query, dict(spec.params))
    for msg in errors:
        problems.add(f"{loc}.params", msg, "bad_param")
    return None if errors else QueryPlan(spec.query, query, bound)


def plan_composite(settings: Settings, name: str, query: Mapping[str, str]) -> tuple[CompositeConfig, dict[str, Plan]]:
    """Fill a declared composite's templates from typed query parameters.

    Raises NotFoundError for an unknown composite, ValidationFailedError for missing, unknown or mistyped params.
    """
    composite = settings.composites.get(name)
    if composite is None:
        raise NotFoundError(f"unknown composite '{name}'")
    problems = _Problems()
    values: dict[str, Any] = {}
    for key in query:
        if key not in composite.params:
            problems.add(f"query.{key}", f"unknown parameter '{key}'", "unknown_param")
    for key, type_ in composite.params.items():
        if key not in query:
            problems.add(f"query.{key}", f"missing parameter '{key}' ({type_})", "missing_param")
            continue
        try:
            values[key] = coerce(query[key], type_)
        except ValueError as exc:
            problems.add(f"query.{key}", f"parameter '{key}': {exc}", "bad_param")
    problems.raise_if_any("composite request")
    plans: dict[str, Plan] = {}
    for sname, source in composite.sources.items():
        plan = _plan_composite_source(settings, f"sources.{sname}", source, values, problems)
        if plan is not None:
            plans[sname] = plan
    problems.raise_if_any("composite request")
    return composite, plans


def _plan_composite_source(
    settings: Settings, loc: str, source: CompositeSource, values: dict[str, Any], problems: _Problems
) -> Plan | None:
    fields = tuple(source.fields) if source.fields is not None else None
    if source.upstream is not None:
        assert source.path is not None
        # Each value is percent-encoded whole, so a value can never add a path segment or a '..'.
        path = source.path.format_map({k: quote(_text(v), safe="") for k, v in values.items()})
        spec = UpstreamSourceSpec(
            upstream=source.upstream,
            path=path,
            method=source.method,
            params={k: _fill(t, values) for k, t in source.params.items()},
        )
        plan = _plan_upstream(settings, loc, spec, problems)
        if plan is None:
            return None
        return UpstreamPlan(plan.upstream, plan.out, fields, source.required)
    assert source.query is not None
    qplan = _plan_query(
        settings,
        loc,
        QuerySourceSpec(query=source.query, params={k: _fill(t, values) for k, t in source.params.items()}),
        problems,
    )
    if qplan is None:
        return None
    return QueryPlan(qplan.query, qplan.config, qplan.params, fields, source.required)


def _fill(template: str, values: dict[str, Any]) -> Any:
    # A template that is exactly one placeholder keeps the typed value; anything else becomes text.
    if template.startswith("{") and template.endswith("}") and template[1:-1] in values:
        return values[template[1:-1]]
    return template.format_map({k: _text(v) for k, v in values.items()})


# Bodies up to this size are decoded on the loop (well under a millisecond); larger ones in a worker process.
INLINE_JSON_BYTES = 64 * 1024


def effective_deadline_s(settings: Settings, requested_ms: float | None) -> float:
    limits = settings.limits
    ms = limits.default_deadline_ms if requested_ms is None else requested_ms
    return min(ms, limits.max_deadline_ms) / 1000


class Aggregator:
    def __init__(
        self,
        upstreams: UpstreamClient,
        db: Database | None,
        cpu: CpuPool | None,
        *,
        tracing: Tracing | None = None,
        scope: Scope | None = None,
        split_keys: bool = False,
    ) -> None:
        self._upstreams = upstreams
        self._db = db
        self._cpu = cpu
        self._tracing = tracing
        self._scope: Scope = scope if scope is not None else {}
        # Flat merging needs each object's keys; large bodies then come back from the worker key by key.
        self._split_keys = split_keys
        self._expired = False  # the request's deadline passed (run)

    async def run(
        self, plans: Mapping[str, Plan], deadline_s: float, *, headers: Mapping[str, str]
    ) -> dict[str, SourceResult]:
        """Run every source concurrently; none outlives the deadline, and every source gets a result.

        The TaskGroup is the structured part: if this coroutine is cancelled (the client went away), every
        source task is cancelled with it, and upstream connections are closed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        results: dict[str, SourceResult] = {}
        tasks: list[asyncio.Task[None]] = []

        def expire() -> None:
            # One timer per request, not a timeout per source: what is still running now is cut short, and each
            # source turns that cancellation into its own `deadline` result (_run_source).
            self._expired = True
            for task in tasks:
                task.cancel()

        started = time.perf_counter()
        timer = loop.call_at(deadline, expire)
        try:
            async with asyncio.TaskGroup() as tg:
                for name, plan in plans.items():
                    tasks.append(
                        tg.create_task(self._one(name, plan, deadline, headers, results), name=f"source:{name}")
                    )
        finally:
            timer.cancel()
        # A source cancelled before its task first ran (a deadline already past) never got to write its result.
        missed = DeadlineExceededError("the request's deadline passed before this source finished")
        return {name: results[name] if name in results else _failed(missed, started, 1) for name in plans}

    async def _one(
        self, name: str, plan: Plan, deadline: float, headers: Mapping[str, str], out: dict[str, SourceResult]
    ) -> None:
        kind = "upstream" if isinstance(plan, UpstreamPlan) else "query"
        if self._tracing is None:
            out[name] = await self._run_source(name, plan, deadline, headers)
            return
        if not self._tracing.enabled:
            traced = {**headers, "traceparent": self._tracing.traceparent(self._scope)}
            out[name] = await self._run_source(name, plan, deadline, traced)
            return
        with self._tracing.source_span(self._scope, name, kind) as (trace_headers, span):
            out[name] = result = await self._run_source(name, plan, deadline, {**headers, **trace_headers})
            error = result["error"]
            record_outcome(span, error["type"] if error is not None else "ok", result["attempts"])

    async def _run_source(self, name: str, plan: Plan, deadline: float, headers: Mapping[str, str]) -> SourceResult:
        started = time.perf_counter()
        progress = Progress()
        try:
            if isinstance(plan, UpstreamPlan):
                result = await self._upstreams.call(
                    plan.upstream, plan.out, deadline=deadline, headers=headers, progress=progress
                )
                data = await self._decode(plan, result)
                status, attempts = result.status, result.attempts
            else:
                progress.attempts = 1
                status, data, attempts = None, select(await self._query(plan, deadline), plan.fields), 1
            return _ok(status, data, started, attempts)
        except asyncio.CancelledError:
            # The request's deadline timer (run) cancels once; a cancellation from anywhere else (the client went
            # away, the server is cutting the drain short) stays a cancellation, as asyncio.timeout() does it.
            task = asyncio.current_task()
            if not self._expired or task is None or task.uncancel() > 0:
                raise
            err = DeadlineExceededError("the request's deadline passed before this source finished")
            return _failed(err, started, max(1, progress.attempts))
        except TimeoutError:
            err = DeadlineExceededError("the request's deadline passed before this source finished")
            return _failed(err, started, max(1, progress.attempts))
        except SourceError as err:
            return _failed(err, started, err.attempts)

    async def _decode(self, plan: UpstreamPlan, result: Result) -> Any:
        body = result.body
        is_json = "json" in result.headers.get("content-type", "")
        if not is_json or len(body) <= INLINE_JSON_BYTES or self._cpu is None:
            return select(decode_body(body, result.headers, plan.upstream), plan.fields)
        try:
            kind, payload = await digest_in_pool(self._cpu, body, plan.fields, split_keys=self._split_keys)
        except (OverloadedError, ResourceClosedError):
            # Every worker is busy (or the pool is closing): decoding here stalls the loop for a moment, which
            # beats failing the source.
            return select(decode_body(body, result.headers, plan.upstream), plan.fields)
        except ProblemError as exc:  # a worker that died or overran on this body: the body is the likely cause
            raise BadResponseError(f"{plan.upstream}: the body could not be decoded ({exc.title})") from exc
        if kind == "error":
            raise BadResponseError(f"{plan.upstream} sent {payload}")
        if kind == "items":
            return {key: orjson.Fragment(value) for key, value in payload}
        return orjson.Fragment(payload)

    async def _query(self, plan: QueryPlan, deadline: float) -> Any:
        if self._db is None:
            raise DatabaseUnavailableError("no database is configured")
        remaining_ms = (deadline - asyncio.get_running_loop().time()) * 1000
        timeout_ms = max(1.0, min(plan.config.timeout_ms, remaining_ms))
        result = await self._db.fetch(
            plan.config.sql, plan.params, timeout_ms=timeout_ms, max_rows=plan.config.max_rows, name=plan.query
        )
        return result.rows


def merge_flat(results: Mapping[str, SourceResult]) -> dict[str, Any]:
    """One flat object: the keys of every successful object result, later sources never overwriting earlier
    ones (a clash is kept under "<source>.<key>"); non-object results sit under their source's name."""
    merged: dict[str, Any] = {}
    for name, result in results.items():
        data = result["data"]
        if not result["ok"]:
            continue
        if isinstance(data, dict):
            for key, value in data.items():
                merged[key if key not in merged else f"{name}.{key}"] = value
        else:
            merged[name] = data
    return merged


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _ok(status: int | None, data: Any, started: float, attempts: int) -> SourceResult:
    return {
        "ok": True,
        "status": status,
        "data": data,
        "error": None,
        "elapsed_ms": round((time.perf_counter() - started) * 1000, 1),
        "attempts": attempts,
    }


def _failed(err: SourceError, started: float, attempts: int) -> SourceResult:
    return {
        "ok": False,
        "status": err.status,
        "data": None,
        "error": {"type": err.kind, "message": err.message},
        "elapsed_ms": round((time.perf_counter() - started) * 1000, 1),
        "attempts": attempts,
    }
