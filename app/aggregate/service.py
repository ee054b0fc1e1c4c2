"""Plan an aggregate (validate every source against the config) and run it: concurrent, deadline-bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from app.aggregate.models import AggregateRequest, QuerySourceSpec, SourceResult, UpstreamSourceSpec
from app.db.pool import Database
from app.db.queries import bind
from app.errors import DeadlineExceededError, SourceError, ValidationFailedError
from app.settings import QueryConfig, Settings, UpstreamConfig
from app.upstream.call import call_once
from app.upstream.paths import UnsafePathError, confine_path, join_url
from app.upstream.session import HttpSession


@dataclass(frozen=True)
class UpstreamPlan:
    name: str
    config: UpstreamConfig
    spec: UpstreamSourceSpec
    path: str


@dataclass(frozen=True)
class QueryPlan:
    name: str
    config: QueryConfig
    params: dict[str, Any]


Plan = UpstreamPlan | QueryPlan


def plan_request(settings: Settings, request: AggregateRequest) -> dict[str, Plan]:
    """Resolve every source against the config. Raises ValidationFailedError naming each problem."""
    errors: list[dict[str, Any]] = []
    if len(request.sources) > settings.limits.max_sources:
        errors.append(
            {
                "loc": "sources",
                "msg": f"at most {settings.limits.max_sources} sources per request",
                "type": "too_many_sources",
            }
        )
    plans: dict[str, Plan] = {}
    for name, spec in request.sources.items():
        loc = f"sources.{name}"
        if isinstance(spec, UpstreamSourceSpec):
            upstream = settings.upstreams.get(spec.upstream)
            if upstream is None:
                errors.append(
                    {"loc": f"{loc}.upstream", "msg": f"unknown upstream '{spec.upstream}'", "type": "unknown_upstream"}
                )
                continue
            try:
                path = confine_path(spec.path)
                join_url(upstream.base_url, path)
            except (UnsafePathError, UnicodeDecodeError) as exc:
                errors.append({"loc": f"{loc}.path", "msg": str(exc), "type": "unsafe_path"})
                continue
            refused = sorted(h for h in spec.headers if h.lower() not in upstream.forward_headers)
            if refused:
                errors.append(
                    {
                        "loc": f"{loc}.headers",
                        "msg": f"headers not allowed: {', '.join(refused)}",
                        "type": "header_not_allowed",
                    }
                )
                continue
            plans[name] = UpstreamPlan(name, upstream, spec, path)
        else:
            assert isinstance(spec, QuerySourceSpec)
            query = settings.queries.get(spec.query)
            if query is None:
                errors.append({"loc": f"{loc}.query", "msg": f"unknown query '{spec.query}'", "type": "unknown_query"})
                continue
            bound, problems = bind(query, dict(spec.params))
            errors.extend({"loc": f"{loc}.params", "msg": p, "type": "bad_param"} for p in problems)
            if not problems:
                plans[name] = QueryPlan(spec.query, query, bound)
    if errors:
        raise ValidationFailedError(f"{len(errors)} problem(s) in the aggregate request", errors=errors)
    return plans


def effective_deadline_s(settings: Settings, requested_ms: float | None) -> float:
    limits = settings.limits
    ms = limits.default_deadline_ms if requested_ms is None else min(requested_ms, limits.max_deadline_ms)
    return ms / 1000


class Aggregator:
    def __init__(self, settings: Settings, http: HttpSession, db: Database | None) -> None:
        self._settings = settings
        self._http = http
        self._db = db

    async def run(self, plans: dict[str, Plan], deadline_s: float) -> dict[str, SourceResult]:
        """Run every source concurrently; none outlives the deadline, and every source gets a result."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        results: dict[str, SourceResult] = {}
        async with asyncio.TaskGroup() as tg:
            for name, plan in plans.items():
                tg.create_task(self._one(name, plan, deadline, results), name=f"source:{name}")
        return {name: results[name] for name in plans}

    async def _one(self, name: str, plan: Plan, deadline: float, out: dict[str, SourceResult]) -> None:
        started = time.perf_counter()
        attempts = 1
        try:
            async with asyncio.timeout_at(deadline):
                status, data = await self._dispatch(plan, deadline)
            out[name] = _ok(status, data, started, attempts)
        except TimeoutError:
            err = DeadlineExceededError("the request's deadline passed before this source finished")
            out[name] = _failed(err, started, attempts)
        except SourceError as err:
            out[name] = _failed(err, started, attempts)

    def _dispatch(self, plan: Plan, deadline: float) -> Awaitable[tuple[int | None, Any]]:
        if isinstance(plan, UpstreamPlan):
            return self._upstream(plan, deadline)
        return self._query(plan, deadline)

    async def _upstream(self, plan: UpstreamPlan, deadline: float) -> tuple[int | None, Any]:
        cfg = plan.config
        remaining = deadline - asyncio.get_running_loop().time()
        timeout_s = max(0.001, min(cfg.timeout_ms / 1000, remaining))
        headers = {k: v for k, v in plan.spec.headers.items()}
        headers["X-Request-Deadline-Ms"] = str(max(1, int(remaining * 1000)))
        reply = await call_once(
            self._http.session,
            upstream=plan.spec.upstream,
            method=plan.spec.method,
            url=join_url(cfg.base_url, plan.path),
            params={k: _text(v) for k, v in plan.spec.params.items()},
            body=plan.spec.body,
            headers=headers,
            timeout_s=timeout_s,
            connect_timeout_s=cfg.connect_timeout_ms / 1000,
            max_bytes=cfg.max_response_bytes,
        )
        return reply.status, reply.data

    async def _query(self, plan: QueryPlan, deadline: float) -> tuple[int | None, Any]:
        if self._db is None:
            raise SourceError("no database is configured")
        remaining_ms = (deadline - asyncio.get_running_loop().time()) * 1000
        timeout_ms = max(1.0, min(plan.config.timeout_ms, remaining_ms))
        result = await self._db.fetch(
            plan.config.sql, plan.params, timeout_ms=timeout_ms, max_rows=plan.config.max_rows
        )
        return None, result.rows


def _text(value: str | int | float | bool) -> str:
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
