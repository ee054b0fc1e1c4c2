"""Run a planned aggregate: every source concurrently, none outliving the request's deadline, each ending in a
result (app/aggregate/results.py) whatever happens to it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.types import Scope

from app.aggregate.models import SourceResult
from app.aggregate.plan import Plan, QueryPlan, UpstreamPlan
from app.aggregate.results import failed, ok
from app.compute.jsonwork import digest_in_pool
from app.compute.pool import CpuPool
from app.db.pool import Database
from app.errors import (
    BadResponseError,
    DatabaseUnavailableError,
    DeadlineExceededError,
    OverloadedError,
    ProblemError,
    ResourceClosedError,
    SourceError,
)
from app.observability.tracing import Tracing, record_outcome
from app.upstream.call import decode_body
from app.upstream.client import Progress, Result, UpstreamClient
from app.worker.jsondigest import select

# Bodies up to this size are decoded on the loop (well under a millisecond); larger ones in a worker process.
INLINE_JSON_BYTES = 64 * 1024


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
            if len(plans) == 1:
                # One source runs in the request's own task: no task and no group to pay for. The timer then
                # cancels this task, which _run_source turns into the source's `deadline` result as it would in a
                # task of its own (and any other cancellation stays one).
                ((name, plan),) = plans.items()
                current = asyncio.current_task()
                assert current is not None
                tasks.append(current)
                await self._one(name, plan, deadline, headers, results)
            else:
                async with asyncio.TaskGroup() as tg:
                    for name, plan in plans.items():
                        tasks.append(
                            tg.create_task(self._one(name, plan, deadline, headers, results), name=f"source:{name}")
                        )
        finally:
            timer.cancel()
        # A source cancelled before its task first ran (a deadline already past) never got to write its result,
        # nor to send anything.
        missed = DeadlineExceededError("the request's deadline passed before this source finished")
        return {name: results[name] if name in results else failed(missed, started, 0) for name in plans}

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
        # The attempts actually sent, whatever ends the source: none when the breaker was open, the deadline passed
        # while it waited for a slot, or its query never left the queue.
        progress = Progress()
        try:
            if isinstance(plan, UpstreamPlan):
                result = await self._upstreams.call(
                    plan.upstream, plan.out, deadline=deadline, headers=headers, progress=progress
                )
                status, data = result.status, await self._decode(plan, result)
            else:
                status, data = None, select(await self._query(plan, deadline, progress), plan.fields)
            return ok(status, data, started, progress.attempts, progress.cache)
        except asyncio.CancelledError:
            # The request's deadline timer (run) cancels once; a cancellation from anywhere else (the client went
            # away, the server is cutting the drain short) stays a cancellation, as asyncio.timeout() does it.
            task = asyncio.current_task()
            if not self._expired or task is None or task.uncancel() > 0:
                raise
            err = DeadlineExceededError("the request's deadline passed before this source finished")
            return failed(err, started, progress.attempts, progress.cache)
        except TimeoutError:
            err = DeadlineExceededError("the request's deadline passed before this source finished")
            return failed(err, started, progress.attempts, progress.cache)
        except SourceError as err:
            return failed(err, started, progress.attempts, progress.cache)

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

    async def _query(self, plan: QueryPlan, deadline: float, progress: Progress) -> Any:
        if self._db is None:
            raise DatabaseUnavailableError("no database is configured")
        remaining_ms = (deadline - asyncio.get_running_loop().time()) * 1000
        timeout_ms = max(1.0, min(plan.config.timeout_ms, remaining_ms))
        result = await self._db.fetch(
            plan.config.sql,
            plan.params,
            timeout_ms=timeout_ms,
            max_rows=plan.config.max_rows,
            name=plan.query,
            on_sent=lambda: _count_attempt(progress),  # in the DB executor's thread; one writer, read after
        )
        return result.rows


def _count_attempt(progress: Progress) -> None:
    progress.attempts += 1
