"""The gateway's Prometheus registry, and the observers that resource hooks and middleware report into.

Counters and histograms are updated by hooks (executor, upstream client, database, HTTP middleware); gauges are read
at scrape time from the live objects (StateCollector), so they are never stale and need no bookkeeping. The names
and their meaning are listed in docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from app import __version__

if TYPE_CHECKING:
    from app.compute.stats import JobRecord
    from app.compute.workers import ExitReason
    from app.state import GatewayState
    from app.upstream.breaker import BreakerState

LOOP_LAG_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
JOB_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Every metric object of one gateway process, in its own registry (created by the lifespan)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        PlatformCollector(registry=r)
        Gauge("gateway_build_info", "Build information; always 1.", ["version"], registry=r).labels(__version__).set(1)

        self.loop_lag = Histogram(
            "gateway_event_loop_lag_seconds", "How late the loop ran a timer.", buckets=LOOP_LAG_BUCKETS, registry=r
        )
        self.loop_blocked = Counter(
            "gateway_event_loop_blocked", "Callbacks that blocked the loop past the detector threshold.", registry=r
        )

        self.requests = Counter(
            "gateway_http_requests", "HTTP requests answered.", ["route", "method", "status"], registry=r
        )
        self.request_latency = Histogram(
            "gateway_http_request_duration_seconds", "HTTP request latency.", ["route", "method"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        # gateway_http_requests_in_flight and gateway_drain_cancelled_requests_total come from the drain's own
        # collector (app/lifecycle/drain.py), which owns the in-flight count.
        self.shed = Counter("gateway_http_requests_shed", "Requests refused at once with 503.", ["reason"], registry=r)
        self.admission_limit = Gauge(
            "gateway_http_admission_limit", "Requests admitted at once, at most (lowered while the loop lags).",
            registry=r,
        )  # fmt: skip

        self.db_executor = ExecutorMetrics("db_executor", "DB executor", r)
        self.cpu_queue_wait = Histogram(
            "gateway_cpu_pool_queue_wait_seconds", "Time from admission to a worker starting the job.",
            buckets=WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.cpu_run = Histogram(
            "gateway_cpu_pool_run_seconds", "Time a job ran in its worker.", buckets=JOB_BUCKETS, registry=r
        )
        self.cpu_rejected = Counter("gateway_cpu_pool_rejected", "Jobs refused: the queue was full.", registry=r)
        self.cpu_timeouts = Counter("gateway_cpu_pool_timeouts", "Jobs killed for overrunning.", registry=r)
        self.cpu_restarts = Counter("gateway_cpu_pool_worker_restarts", "Workers replaced.", registry=r)
        self.cpu_transfer = Counter(
            "gateway_cpu_pool_transfer_bytes", "Array bytes moved to and from workers.", ["transport"], registry=r
        )
        self.cpu_pool = CpuPoolMetrics(self)

        self.db_query = Histogram(
            "gateway_db_query_duration_seconds", "Named query latency.", ["query", "outcome"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream = UpstreamMetrics(r)
        self.security = SecurityMetrics(r)

        # Known label values start at 0, so rate() and dashboards see a series before the first event.
        self._shed_by_reason = {
            reason: self.shed.labels(reason) for reason in ("in_flight", "loop_lag", "cpu_queue", "draining")
        }
        for transport in ("shm", "pickle"):
            self.cpu_transfer.labels(transport)

    def request_shed(self, reason: str) -> None:
        """AdmissionObserver (app/security/admission.py)."""
        child = self._shed_by_reason.get(reason)
        (child if child is not None else self.shed.labels(reason)).inc()

    def limit_changed(self, limit: int) -> None:
        self.admission_limit.set(limit)

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def register_state(self, state: GatewayState, lag_window: Callable[[], float]) -> None:
        self.registry.register(StateCollector(state, lag_window))
        self.upstream.prime(state.settings.upstreams)


class ExecutorMetrics:
    """ExecutorObserver for app.db.executor.BoundedExecutor; called from worker threads (prometheus-client's
    metric objects are thread-safe)."""

    def __init__(self, prefix: str, what: str, registry: CollectorRegistry) -> None:
        self._queue_wait = Histogram(
            f"gateway_{prefix}_queue_wait_seconds", f"{what}: time from submit to start.", buckets=WAIT_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self._run = Histogram(
            f"gateway_{prefix}_run_seconds", f"{what}: time in the thread.", buckets=JOB_BUCKETS, registry=registry
        )
        self._rejected = Counter(f"gateway_{prefix}_rejected", f"{what}: jobs refused, queue full.", registry=registry)

    def job_started(self, queue_wait_s: float) -> None:
        self._queue_wait.observe(queue_wait_s)

    def job_finished(self, run_s: float) -> None:
        self._run.observe(run_s)

    def job_rejected(self) -> None:
        self._rejected.inc()


class CpuPoolMetrics:
    """PoolObserver for app.compute.pool.CpuPool; called on the event loop."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def job_rejected(self, transform: str) -> None:
        self._m.cpu_rejected.inc()

    def job_started(self, transform: str, queue_wait_s: float) -> None:
        self._m.cpu_queue_wait.observe(queue_wait_s)

    def job_finished(self, record: JobRecord) -> None:
        self._m.cpu_run.observe(record.run_s)
        if record.outcome == "timeout":
            self._m.cpu_timeouts.inc()
        self._m.cpu_transfer.labels("shm").inc(record.shm_bytes)
        self._m.cpu_transfer.labels("pickle").inc(record.pickle_bytes)

    def worker_exited(self, pid: int | None, reason: ExitReason) -> None:
        # A worker replaced for any reason but a clean shutdown: recycled, crashed, killed on timeout.
        if reason in ("recycled", "crashed", "killed"):
            self._m.cpu_restarts.inc()


class UpstreamMetrics:
    """UpstreamObserver for app.upstream.client.UpstreamClient; labels are upstream names from the config."""

    def __init__(self, r: CollectorRegistry) -> None:
        self._wait = Histogram(
            "gateway_upstream_semaphore_wait_seconds", "Time waiting for a concurrency slot.", ["upstream"],
            buckets=WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self._latency = Histogram(
            "gateway_upstream_request_duration_seconds", "One attempt's latency.", ["upstream", "outcome"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self._retries = Counter("gateway_upstream_retries", "Retries sent.", ["upstream"], registry=r)
        self._budget = Counter(
            "gateway_upstream_retry_budget_exhausted", "Retries refused by the budget.", ["upstream"], registry=r
        )
        self._transitions = Counter(
            "gateway_upstream_breaker_transitions", "Breaker state changes.", ["upstream", "to"], registry=r
        )
        self._wait_children: dict[str, Histogram] = {}
        self._latency_children: dict[tuple[str, str], Histogram] = {}

    def prime(self, upstreams: Iterable[str]) -> None:
        for name in upstreams:
            self._retries.labels(name)
            self._budget.labels(name)
            for state in ("open", "half_open", "closed"):
                self._transitions.labels(name, state)

    def semaphore_wait(self, upstream: str, seconds: float) -> None:
        child = self._wait_children.get(upstream)
        if child is None:
            child = self._wait_children[upstream] = self._wait.labels(upstream)
        child.observe(seconds)

    def attempt(self, upstream: str, outcome: str, seconds: float) -> None:
        # Twice per call on the hot path: the labelled child is looked up once (labels() takes a lock and
        # validates), then kept. Both keys come from the config and a fixed set of outcomes: bounded.
        child = self._latency_children.get((upstream, outcome))
        if child is None:
            child = self._latency_children[upstream, outcome] = self._latency.labels(upstream, outcome)
        child.observe(seconds)

    def retry(self, upstream: str) -> None:
        self._retries.labels(upstream).inc()

    def budget_exhausted(self, upstream: str) -> None:
        self._budget.labels(upstream).inc()

    def breaker_transition(self, upstream: str, to: BreakerState) -> None:
        self._transitions.labels(upstream, to.name.lower()).inc()


class SecurityMetrics:
    """SecurityObserver for app.security.guard.Guard; ``key`` labels are key names from the config (``<jwt>`` for
    every bearer token, whose subjects are unbounded); ``reason`` and ``outcome`` are closed sets."""

    def __init__(self, r: CollectorRegistry) -> None:
        self._auth_failures = Counter(
            "gateway_auth_failures", "Requests refused by authentication or scope.", ["reason"], registry=r
        )
        self._rate_limited = Counter(
            "gateway_rate_limited", "Requests refused with 429 by a key's rate limit.", ["key"], registry=r
        )
        self._backend_errors = Counter(
            "gateway_rate_limit_backend_errors", "Shared rate-limit backend failures.", registry=r
        )
        self._jwks_fetches = Counter(
            "gateway_jwks_fetches", "JWKS fetches from the identity provider, by outcome.", ["outcome"], registry=r
        )
        for outcome in ("changed", "unchanged", "failed"):
            self._jwks_fetches.labels(outcome)

    def auth_failed(self, reason: str) -> None:
        self._auth_failures.labels(reason).inc()

    def rate_limited(self, key: str) -> None:
        self._rate_limited.labels(key).inc()

    def jwks_fetched(self, outcome: str) -> None:
        self._jwks_fetches.labels(outcome).inc()

    def backend_error(self) -> None:
        self._backend_errors.inc()


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
        for name, up in client.upstreams.items():
            in_flight.add_metric([name], up.in_flight)
            limit.add_metric([name], up.config.max_concurrency)
            breaker.add_metric([name], int(up.breaker.state))
        yield in_flight
        yield limit
        yield breaker


def _task_count(state: GatewayState) -> int:
    loop = state.loop
    if loop is None or loop.is_closed():
        return 0
    # all_tasks() is documented for the running loop; from the scrape (which runs on that loop) it is exact.
    return len(asyncio.all_tasks(loop))
