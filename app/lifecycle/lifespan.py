"""The lifespan: opens every long-lived resource in order, closes them in reverse, also after a failed start.

Order and why:
  1. metrics          everything after it reports into the registry
  1b. tracing        OpenTelemetry provider, when configured (closed late: flushes the last spans)
  1c. guard          API keys and the rate limiter (a Redis connection pool when shared); refuses to start
                     when authentication is on without keys
  2. http             the shared aiohttp session
  3. upstreams        limits, breakers and retry budgets per upstream; for those with several endpoints, a
                     connector per endpoint, the DNS refresh (its own two resolver threads), health checks; caches
                     and single flights, and the shared cache's Redis connection pool when an upstream keeps its
                     entries there
  4. database         the bounded DB thread executor and the psycopg2 pool it owns (connections opened off the loop)
  5. cpu_pool         worker processes, pre-warmed
  5b. diagnostics     fault handler, SIGUSR1 dump, task ages, tracemalloc when configured
  6. loop_lag         background sampler task
  6b. collector       the garbage collector on the loop's clock instead of its allocation count (app/lifecycle/heap.py)
  7. blocking_detector  heartbeat + watchdog thread naming code that blocks the loop
  8. admin_listener   /metrics on its own port, when configured (closed first, after the public drain)
Closing runs backwards: background tasks stop, workers finish and exit, the DB executor finishes its running
queries before the pool closes its connections, then the HTTP session closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Protocol

from fastapi import FastAPI

from app.compute.pool import CpuPool
from app.db.pool import Database
from app.diagnostics.runtime import Diagnostics
from app.lifecycle.gauges import StateCollector
from app.lifecycle.heap import ClockedCollector
from app.lifecycle.readiness import Readiness
from app.observability.admin import AdminListener, create_admin_app
from app.observability.blocking import BlockingDetector
from app.observability.looplag import LoopLagSampler
from app.observability.metrics import Metrics
from app.observability.tracing import Tracing
from app.security.guard import Guard
from app.settings import Settings
from app.state import GatewayState
from app.upstream.client import UpstreamClient
from app.upstream.session import HttpSession

log = logging.getLogger("app.lifecycle")


class Resource(Protocol):
    async def start(self) -> None: ...
    async def aclose(self) -> None: ...


class _NoStart:
    """Adapts an object that is usable from construction (the executor) to start()/aclose()."""

    def __init__(self, aclose: Callable[[], Awaitable[None]]) -> None:
        self._aclose = aclose

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        await self._aclose()


def expected_resources(settings: Settings) -> list[str]:
    names = ["metrics", "tracing", "guard", "http", "upstreams"]
    if settings.database_url is not None:
        names.append("database")
    if settings.compute.enabled:
        names.append("cpu_pool")
    names += ["diagnostics", "loop_lag", "collector", "blocking_detector"]
    if settings.observability.admin_port is not None:
        names.append("admin_listener")
    return names


async def _open(stack: AsyncExitStack, readiness: Readiness, name: str, resource: Resource) -> None:
    log.info("opening %s", name, extra={"resource": name, "event": "opening"})

    async def close() -> None:
        readiness.mark_stopped(name)
        try:
            await resource.aclose()
        finally:
            log.info("closed %s", name, extra={"resource": name, "event": "closed"})

    # Registered before start(): a resource that fails half way through its own start still gets aclose(),
    # which every resource module makes safe on a partly started object.
    stack.push_async_callback(close)
    await resource.start()
    readiness.mark_started(name)
    log.info("opened %s", name, extra={"resource": name, "event": "opened"})


def build_lifespan(state: GatewayState) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The lifespan of the app built around ``state`` (app/main.py): it opens the resources onto ``state``."""
    settings = state.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        readiness = state.readiness
        state.metrics = metrics = Metrics()
        state.loop = asyncio.get_running_loop()
        obs = settings.observability
        admission = state.admission
        sampler = LoopLagSampler(
            metrics.loop_lag, interval_s=obs.loop_lag_interval_ms / 1000, on_sample=admission.adapt
        )
        async with AsyncExitStack() as stack:
            await _open(stack, readiness, "metrics", _NoStart(_noop))
            admission.observe(metrics)
            metrics.add_collector(StateCollector(state, sampler.worst_recent_s))
            metrics.upstream.prime(settings.upstreams)
            metrics.cache.prime((name, up.cache.enabled) for name, up in settings.upstreams.items() if up.cache.active)
            metrics.security.prime(key.name for key in settings.auth.keys)
            state.tracing = Tracing(obs.tracing, provider=state.tracer_provider)
            await _open(stack, readiness, "tracing", state.tracing)
            state.guard = Guard(settings, observer=metrics.security)
            await _open(stack, readiness, "guard", state.guard)

            state.http = HttpSession(settings.http)
            await _open(stack, readiness, "http", state.http)
            state.upstreams = UpstreamClient(
                settings,
                state.http,
                observer=metrics.upstream,
                cache_observer=metrics.cache,
                loop_stall=sampler.stall_within,
            )
            await _open(stack, readiness, "upstreams", state.upstreams)

            if settings.database_url is not None:
                state.db = Database(
                    settings.database_url.get_secret_value(),
                    settings.database,
                    observer=metrics.db_executor,
                    on_query=lambda name, outcome, s: metrics.db_query.labels(name, outcome).observe(s),
                )
                await _open(stack, readiness, "database", state.db)

            if settings.compute.enabled:
                state.cpu = CpuPool(settings.compute, observer=metrics.cpu_pool)
                await _open(stack, readiness, "cpu_pool", state.cpu)

            state.diagnostics = Diagnostics(settings.diagnostics, db=state.db, cpu=state.cpu)
            await _open(stack, readiness, "diagnostics", state.diagnostics)
            await _open(stack, readiness, "loop_lag", sampler)
            collector = ClockedCollector(settings.server.gc_interval_s, metrics.gc_pause)
            await _open(stack, readiness, "collector", collector)
            detector = BlockingDetector(metrics.loop_blocked, threshold_s=obs.blocking_threshold_ms / 1000)
            await _open(stack, readiness, "blocking_detector", detector)
            if obs.admin_port is not None:
                admin = AdminListener(
                    create_admin_app(state), host=obs.admin_host or settings.server.host, port=obs.admin_port
                )
                await _open(stack, readiness, "admin_listener", admin)
                state.admin_port = admin.port

            log.info("gateway ready", extra={"event": "ready"})
            try:
                yield
            finally:
                readiness.stopping = True
                log.info("gateway stopping", extra={"event": "stopping"})

    return lifespan


async def _noop() -> None:
    return None
