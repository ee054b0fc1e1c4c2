"""Run a planned aggregate: every source concurrently, none outliving the request's deadline, each ending in a
result (app/aggregate/results.py) whatever happens to it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, Protocol

import orjson
from starlette.types import Scope

from app.aggregate.chain import ChainedPlan
from app.aggregate.models import SourceResult
from app.aggregate.plan import Plan
from app.aggregate.plans import QueryPlan, UpstreamPlan
from app.aggregate.results import failed, fanned_out, ok
from app.compute.jsonwork import digest_in_pool
from app.compute.pool import CpuPool
from app.db.pool import Database
from app.errors import (
    BadResponseError,
    DatabaseUnavailableError,
    DeadlineExceededError,
    DependencyFailedError,
    OverloadedError,
    ProblemError,
    ResourceClosedError,
    SourceError,
    TooManyItemsError,
)
from app.observability.tracing import Tracing, record_outcome
from app.upstream.call import decode_body
from app.upstream.client import Progress, Result, UpstreamClient
from app.worker.jsondigest import select

# Bodies up to this size are decoded on the loop (well under a millisecond); larger ones in a worker process.
INLINE_JSON_BYTES = 64 * 1024
_DEADLINE = "the request's deadline passed before this source finished"


class ChainObserver(Protocol):
    """Metrics hook, called on the event loop once per source that waited for others; must not block."""

    def source_waited(self, seconds: float) -> None: ...


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
        observer: ChainObserver | None = None,
        max_calls: int | None = None,
        max_reference_bytes: int = 4096,
    ) -> None:
        self._upstreams = upstreams
        self._db = db
        self._cpu = cpu
        self._tracing = tracing
        self._scope: Scope = scope if scope is not None else {}
        # Flat merging needs each object's keys; large bodies then come back from the worker key by key.
        self._split_keys = split_keys
        self._expired = False  # the request's deadline passed (run)
        # Only for a request whose sources refer to each other (_start_chained):
        self._observer = observer
        self._max_calls = max_calls  # calls in all, for_each's included (limits.max_sources)
        self._calls_left = max_calls if max_calls is not None else 0  # set per request by _start_chained
        self._reference_limit = max_reference_bytes
        self._inline: frozenset[str] = frozenset()  # sources others read: decoded here, never left pre-encoded
        self.waits: dict[str, float] = {}  # seconds each chained source waited for its parents

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

        self._origin = started = time.perf_counter()
        chained = any(type(plan) is ChainedPlan for plan in plans.values())
        timer = loop.call_at(deadline, expire)
        try:
            if chained:
                async with asyncio.TaskGroup() as tg:
                    self._start_chained(tg, tasks, plans, deadline, headers, results)
            elif len(plans) == 1:
                # One source runs in the request's own task: no task and no group to pay for. The timer then
                # cancels this task, which _run_source turns into the source's `deadline` result as it would in a
                # task of its own (and any other cancellation stays one).
                ((name, plan),) = plans.items()
                current = asyncio.current_task()
                assert current is not None
                tasks.append(current)
                # No ChainedPlan here (`chained` is false): a cast would cost the hot path a call.
                await self._one(name, plan, deadline, headers, results)  # type: ignore[arg-type]
            else:
                async with asyncio.TaskGroup() as tg:
                    for name, plan in plans.items():
                        tasks.append(
                            tg.create_task(
                                self._one(name, plan, deadline, headers, results),  # type: ignore[arg-type]
                                name=f"source:{name}",
                            )
                        )
        finally:
            timer.cancel()
        # A source cancelled before its task first ran (a deadline already past) never got to write its result,
        # nor to send anything.
        return {name: results[name] if name in results else _missed(plans[name], started) for name in plans}

    # -- a request whose sources refer to each other ---------------------------------------------------------------
    #
    # Every source gets its task at once, as in a flat request; one that refers to others first waits for them
    # (each source's task sets its `done` event however it ends), so it starts the moment its last parent has
    # answered, and independent branches run side by side. The one deadline timer cancels waiting and running
    # tasks alike; waiting holds no slot, connection or thread, so a cancelled wait leaks nothing.

    def _start_chained(
        self,
        tg: asyncio.TaskGroup,
        tasks: list[asyncio.Task[None]],
        plans: Mapping[str, Plan],
        deadline: float,
        headers: Mapping[str, str],
        results: dict[str, SourceResult],
    ) -> None:
        done = {name: asyncio.Event() for name in plans}
        needs = [plan.needs for plan in plans.values() if isinstance(plan, ChainedPlan)]
        self._inline = frozenset(name for group in needs for name in group)
        if self._max_calls is not None:
            fixed = sum(1 for p in plans.values() if not isinstance(p, ChainedPlan) or p.for_each is None)
            self._calls_left = self._max_calls - fixed
        for name, plan in plans.items():
            node = self._node(name, plan, deadline, headers, results, done)
            tasks.append(tg.create_task(node, name=f"source:{name}"))

    async def _node(
        self,
        name: str,
        plan: Plan,
        deadline: float,
        headers: Mapping[str, str],
        out: dict[str, SourceResult],
        done: Mapping[str, asyncio.Event],
    ) -> None:
        try:
            if isinstance(plan, ChainedPlan):
                await self._chained(name, plan, deadline, headers, out, done)
            else:
                await self._one(name, plan, deadline, headers, out)
        finally:
            done[name].set()  # whatever ended it: its children must not wait past it

    async def _chained(
        self,
        name: str,
        plan: ChainedPlan,
        deadline: float,
        headers: Mapping[str, str],
        out: dict[str, SourceResult],
        done: Mapping[str, asyncio.Event],
    ) -> None:
        waiting_from = time.perf_counter()
        try:
            for parent in plan.needs:
                await done[parent].wait()
        except asyncio.CancelledError:
            if not self._deadline_cancelled():
                raise
            out[name] = _waited(failed(DeadlineExceededError(_DEADLINE), waiting_from, 0, self._origin), plan)
            return
        started = time.perf_counter()
        self.waits[name] = started - waiting_from
        if self._observer is not None:
            self._observer.source_waited(started - waiting_from)
        try:
            _parents_answered(plan, out)
            data = {parent: out[parent]["data"] for parent in plan.needs}
            if plan.for_each is None:
                concrete = plan.make(data, limit=self._reference_limit)
            else:
                items = self._take_items(plan, data)
        except SourceError as err:
            out[name] = _waited(failed(err, started, 0, self._origin), plan)
            return
        if plan.for_each is None:
            await self._one(name, concrete, deadline, headers, out)
            out[name] = _waited(out[name], plan)
            return
        out[name] = _waited(await self._each(name, plan, data, items, started, deadline, headers), plan)

    def _take_items(self, plan: ChainedPlan, data: Mapping[str, Any]) -> list[Any]:
        """The for_each list, its calls taken from the request's budget. Raises DependencyFailedError when there is
        no list, TooManyItemsError when it is longer than max_items or than what the budget has left (first come,
        first served: no await between the check and the taking)."""
        items = plan.items(data)
        if len(items) > plan.max_items:
            raise TooManyItemsError(f"for_each: {len(items)} elements, over max_items ({plan.max_items})")
        if self._max_calls is not None:
            if len(items) > self._calls_left:
                raise TooManyItemsError(
                    f"for_each: {len(items)} more calls would take the request past limits.max_sources"
                    f" ({self._max_calls} calls)"
                )
            self._calls_left -= len(items)
        return items

    async def _each(
        self,
        name: str,
        plan: ChainedPlan,
        data: Mapping[str, Any],
        items: list[Any],
        started: float,
        deadline: float,
        headers: Mapping[str, str],
    ) -> SourceResult:
        """One call per element, concurrently, in a TaskGroup of their own inside the source's task: cancelling the
        source (the deadline, the client gone) cancels every element."""
        out: dict[str, SourceResult] = {}
        keys = [f"{name}[{i}]" for i in range(len(items))]
        if name in self._inline:  # others read this source's elements' data too
            self._inline = self._inline.union(keys)
        try:
            async with asyncio.TaskGroup() as tg:
                for key, item in zip(keys, items, strict=True):
                    try:
                        concrete = plan.make_each(data, item, limit=self._reference_limit)
                    except DependencyFailedError as err:
                        out[key] = failed(err, started, 0, self._origin)
                        continue
                    tg.create_task(self._one(key, concrete, deadline, headers, out), name=f"source:{key}")
        except asyncio.CancelledError:
            if not self._deadline_cancelled():
                raise
        missed = DeadlineExceededError(_DEADLINE)
        return fanned_out(
            [out[key] if key in out else failed(missed, started, 0, self._origin) for key in keys],
            started,
            self._origin,
        )

    def _deadline_cancelled(self) -> bool:
        """Whether the cancellation being handled is the deadline timer's (and only that): then it becomes the
        source's `deadline` result; any other (the client went away, the drain cut short) stays a cancellation."""
        task = asyncio.current_task()
        return self._expired and task is not None and task.uncancel() == 0

    async def _one(
        self,
        name: str,
        plan: UpstreamPlan | QueryPlan,
        deadline: float,
        headers: Mapping[str, str],
        out: dict[str, SourceResult],
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

    async def _run_source(
        self, name: str, plan: UpstreamPlan | QueryPlan, deadline: float, headers: Mapping[str, str]
    ) -> SourceResult:
        started = time.perf_counter()
        # The attempts actually sent, whatever ends the source: none when the breaker was open, the deadline passed
        # while it waited for a slot, or its query never left the queue.
        progress = Progress()
        try:
            if isinstance(plan, UpstreamPlan):
                # Cut at the deadline by run()'s timer, which cancels this task.
                result = await self._upstreams.call(
                    plan.upstream, plan.out, deadline=deadline, headers=headers, progress=progress, cut_at_deadline=True
                )
                status, data = result.status, await self._decode(plan, result, inline=name in self._inline)
            else:
                status, data = None, select(await self._query(plan, deadline, progress), plan.fields)
            return ok(status, data, started, progress.attempts, self._origin, progress.cache)
        except asyncio.CancelledError:
            # The request's deadline timer (run) cancels once; a cancellation from anywhere else (the client went
            # away, the server is cutting the drain short) stays a cancellation, as asyncio.timeout() does it.
            task = asyncio.current_task()
            if not self._expired or task is None or task.uncancel() > 0:
                raise
            err = DeadlineExceededError(_DEADLINE)
            return failed(err, started, progress.attempts, self._origin, progress.cache)
        except TimeoutError:
            err = DeadlineExceededError(_DEADLINE)
            return failed(err, started, progress.attempts, self._origin, progress.cache)
        except SourceError as err:
            return failed(err, started, progress.attempts, self._origin, progress.cache)

    async def _decode(self, plan: UpstreamPlan, result: Result, *, inline: bool = False) -> Any:
        """``inline``: other sources read this one's data, which must then be values, not pre-encoded JSON."""
        body = result.body
        is_json = "json" in result.headers.get("content-type", "")
        if inline or not is_json or len(body) <= INLINE_JSON_BYTES or self._cpu is None:
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


def _waited(result: SourceResult, plan: ChainedPlan) -> SourceResult:
    result["waited_for"] = list(plan.needs)
    return result


def _parents_answered(plan: ChainedPlan, out: Mapping[str, SourceResult]) -> None:
    """Raises DependencyFailedError naming the first parent that failed (or was itself skipped), and why;
    DeadlineExceededError when that was the deadline."""
    for parent in plan.needs:
        result = out.get(parent)
        if result is None:  # its task was cancelled before it ran: only the deadline does that here
            raise DeadlineExceededError(_DEADLINE)
        error = result["error"]
        if error is not None:
            if error["type"] == "deadline":
                # The deadline ended the chain there: what comes after it ran out of time too, as it would have.
                raise DeadlineExceededError(_DEADLINE)
            if error["type"] == "dependency_failed":
                raise DependencyFailedError(f"{parent} was not called: {error['message']}")
            raise DependencyFailedError(f"{parent} failed: {error['type']}")


def _missed(plan: Plan, started: float) -> SourceResult:
    result = failed(DeadlineExceededError(_DEADLINE), started, 0, started)
    return _waited(result, plan) if isinstance(plan, ChainedPlan) else result
