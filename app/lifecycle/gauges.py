"""Gauges read from the live resources at scrape time (registered by the lifespan)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.state import GatewayState
from app.upstream.cache.memory import MemoryStore


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class StateCollector(Collector):
    """Gauges read from the live resources at scrape time."""

    def __init__(self, state: GatewayState, lag_window: Callable[[], float]) -> None:
        self._state = state
        self._lag_window = lag_window

    def collect(self) -> Iterator[Metric]:
        state = self._state
        yield _gauge("gateway_ready", "1 when every resource has started and the gateway is not draining.",
                     float(state.readiness.ready))  # fmt: skip
        yield _gauge("gateway_draining", "1 from SIGTERM until exit.", float(state.readiness.draining))
        yield _gauge("gateway_threads", "Python threads alive.", float(threading.active_count()))
        yield _gauge("gateway_event_loop_lag_max_seconds", "Worst loop lag in the last window.", self._lag_window())
        yield _gauge("gateway_event_loop_tasks", "asyncio tasks alive.", float(_task_count(state)))
        yield from self._db()
        yield from self._cpu()
        yield from self._upstreams()
        yield from self._endpoints()

    def _db(self) -> Iterator[Metric]:
        db = self._state.db
        if db is None:
            return
        stats = db.executor.stats()
        yield _gauge("gateway_db_executor_capacity", "DB executor threads.", stats.capacity)
        yield _gauge("gateway_db_executor_busy", "DB executor threads running a query.", stats.busy)
        yield _gauge("gateway_db_executor_queued", "Queries waiting for a thread.", stats.queued)
        yield _gauge("gateway_db_executor_queue_limit", "Most queries allowed to wait.", stats.queue_limit)
        pool = db.pool_stats()
        conns = GaugeMetricFamily("gateway_db_pool_connections", "psycopg2 pool connections.", labels=["state"])
        conns.add_metric(["in_use"], pool["in_use"])
        conns.add_metric(["idle"], pool["idle"])
        yield conns

    def _cpu(self) -> Iterator[Metric]:
        cpu = self._state.cpu
        if cpu is None:
            return
        stats = cpu.stats()
        settings = self._state.settings.compute
        yield _gauge("gateway_cpu_pool_capacity", "Worker processes.", stats.workers)
        yield _gauge("gateway_cpu_pool_busy", "Workers running a job.", stats.busy)
        yield _gauge("gateway_cpu_pool_queued", "Admitted jobs waiting for a worker.", stats.waiting)
        yield _gauge("gateway_cpu_pool_queue_limit", "Most jobs allowed to wait.", settings.queue_limit)
        yield _gauge("gateway_cpu_pool_shm_bytes", "Shared memory currently held.", float(cpu.shm_bytes_held()))

    def _upstreams(self) -> Iterator[Metric]:
        client = self._state.upstreams
        if client is None:
            return
        in_flight = GaugeMetricFamily("gateway_upstream_in_flight", "Calls in progress.", labels=["upstream"])
        limit = GaugeMetricFamily("gateway_upstream_limit", "Configured concurrency limit.", labels=["upstream"])
        breaker = GaugeMetricFamily(
            "gateway_upstream_breaker_state", "0 closed, 1 half-open, 2 open.", labels=["upstream"]
        )
        held = GaugeMetricFamily(
            "gateway_upstream_cache_bytes", "Bytes held by the in-memory cache (entries, keys, overhead).",
            labels=["upstream"],
        )  # fmt: skip
        entries = GaugeMetricFamily(
            "gateway_upstream_cache_entries", "Entries in the in-memory cache.", labels=["upstream"]
        )
        flights = GaugeMetricFamily(
            "gateway_upstream_cache_flights", "Shared calls in flight (single flight).", labels=["upstream"]
        )
        waiters = GaugeMetricFamily(
            "gateway_upstream_cache_flight_waiters", "Calls waiting on a shared call, its leader included.",
            labels=["upstream"],
        )  # fmt: skip
        for name, up in client.upstreams.items():
            in_flight.add_metric([name], up.in_flight)
            limit.add_metric([name], up.config.max_concurrency)
            breaker.add_metric([name], int(up.breaker.state))
            cache = up.cache
            if cache is None:
                continue
            flights.add_metric([name], cache.in_flight)
            waiters.add_metric([name], cache.waiters)
            store = cache.store
            if isinstance(store, MemoryStore):
                held.add_metric([name], store.bytes_held)
                entries.add_metric([name], store.entries)
        yield in_flight
        yield limit
        yield breaker
        yield held
        yield entries
        yield flights
        yield waiters

    def _endpoints(self) -> Iterator[Metric]:
        """Upstreams with several endpoints: how many are in each state, and the ejections; per endpoint only when
        ``observability.endpoint_metrics`` (one series per address of every balanced upstream: a large fleet's
        worth). Read from the live endpoints, so one that has left disappears with it."""
        client = self._state.upstreams
        if client is None:
            return
        pools = [(name, up.endpoints) for name, up in client.upstreams.items() if up.endpoints is not None]
        if not pools:
            return
        by_state = GaugeMetricFamily(
            "gateway_upstream_endpoints",
            "Endpoints by state (active, ejected, draining).",
            labels=["upstream", "state"],
        )
        ejections = CounterMetricFamily(
            "gateway_upstream_ejections", "Endpoints ejected as outliers.", labels=["upstream"]
        )
        per_endpoint = self._state.settings.observability.endpoint_metrics
        labels = ["upstream", "endpoint"]
        in_flight = GaugeMetricFamily("gateway_upstream_endpoint_in_flight", "Calls in progress.", labels=labels)
        calls = CounterMetricFamily("gateway_upstream_endpoint_calls", "Attempts sent.", labels=labels)
        failures = CounterMetricFamily(
            "gateway_upstream_endpoint_failures", "Connect errors, timeouts, 5xx, failed health checks.", labels=labels
        )
        ejected = CounterMetricFamily("gateway_upstream_endpoint_ejections", "Times ejected.", labels=labels)
        for name, pool in pools:
            views = pool.snapshot()
            for state in ("active", "ejected", "draining"):
                by_state.add_metric([name, state], sum(1 for v in views if v["state"] == state))
            ejections.add_metric([name], pool.balancer.ejections)
            if per_endpoint:
                for v in views:
                    key = [name, v["endpoint"]]
                    in_flight.add_metric(key, v["in_flight"])
                    calls.add_metric(key, v["calls"])
                    failures.add_metric(key, v["failures"])
                    ejected.add_metric(key, v["ejections"])
        yield by_state
        yield ejections
        if per_endpoint:
            yield from (in_flight, calls, failures, ejected)


def _task_count(state: GatewayState) -> int:
    loop = state.loop
    if loop is None or loop.is_closed():
        return 0
    # all_tasks() is documented for the running loop; from the scrape (which runs on that loop) it is exact.
    return len(asyncio.all_tasks(loop))
