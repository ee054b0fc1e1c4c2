"""The gateway's Prometheus registry, and the observers that resource hooks and middleware report into.

Counters and histograms are updated by hooks (executor, upstream client, database, HTTP middleware); gauges are read
at scrape time from the live objects (StateCollector), so they are never stale and need no bookkeeping. The names
and their meaning are listed in docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from app import __version__

if TYPE_CHECKING:
    from app.compute.stats import ExitReason, JobRecord
    from app.upstream.breaker import BreakerState
    from app.upstream.cache.layer import CacheOutcome

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
        self.gc_pause = Histogram(
            "gateway_gc_pause_seconds",
            "Collections the gateway ran on its clock (server.gc_interval_s), by generation: how long each held the"
            " loop.",
            ["generation"],
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
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
        # /aggregate answers by their X-Aggregate-Complete header: a partial answer is a 200 (or, for a composite
        # with a required source, a 502) with at least one failed source, which the status alone does not show.
        self.aggregate_answers = Counter(
            "gateway_aggregate_answers", "Aggregate answers, complete or not.", ["route", "complete"], registry=r
        )
        # Only sources that refer to others (chained) are observed; no label: source names are a client's to choose.
        self.dependency_wait = Histogram(
            "gateway_source_dependency_wait_seconds", "Time a chained source waited for the sources it refers to.",
            buckets=WAIT_BUCKETS, registry=r,
        )  # fmt: skip
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
        self.cache = CacheMetrics(r)
        self.security = SecurityMetrics(r)

        # Known label values start at 0, so rate() and dashboards see a series before the first event.
        self._shed_by_reason = {
            reason: self.shed.labels(reason) for reason in ("in_flight", "loop_lag", "cpu_queue", "draining")
        }
        for generation in ("0", "1", "2"):
            self.gc_pause.labels(generation)
        for transport in ("shm", "pickle"):
            self.cpu_transfer.labels(transport)
        for route in ("/aggregate", "/aggregate/{composite}"):  # the two route templates that answer aggregates
            for complete in ("true", "false"):
                self.aggregate_answers.labels(route, complete)

    def request_shed(self, reason: str) -> None:
        """AdmissionObserver (app/security/admission.py)."""
        child = self._shed_by_reason.get(reason)
        (child if child is not None else self.shed.labels(reason)).inc()

    def source_waited(self, seconds: float) -> None:
        """ChainObserver (app/aggregate/execute.py)."""
        self.dependency_wait.observe(seconds)

    def limit_changed(self, limit: int) -> None:
        self.admission_limit.set(limit)

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)


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
        self._refused = Counter(
            "gateway_upstream_breaker_refused", "Calls refused by an open breaker, nothing sent.", ["upstream"],
            registry=r,
        )  # fmt: skip
        self._wait_children: dict[str, Histogram] = {}
        self._latency_children: dict[tuple[str, str], Histogram] = {}

    def prime(self, upstreams: Iterable[str]) -> None:
        for name in upstreams:
            self._retries.labels(name)
            self._budget.labels(name)
            self._refused.labels(name)
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

    def breaker_refused(self, upstream: str) -> None:
        self._refused.labels(upstream).inc()


class CacheMetrics:
    """CacheObserver for app.upstream.cache (one upstream's cache and single flight); labels are upstream names
    from the config and a closed set of results. Bytes and entries held are gauges read at scrape time
    (app/lifecycle/gauges.py)."""

    RESULTS = ("hit", "miss", "coalesced", "stale")

    def __init__(self, r: CollectorRegistry) -> None:
        self._results = Counter(
            "gateway_upstream_cache", "Cacheable calls by how the cache took part.", ["upstream", "result"], registry=r
        )
        self._evictions = Counter(
            "gateway_upstream_cache_evictions", "Entries evicted to stay within max_bytes.", ["upstream"], registry=r
        )
        self._backend_errors = Counter(
            "gateway_upstream_cache_backend_errors", "Shared cache (Redis) failures, each a miss or a store skipped.",
            ["upstream"], registry=r,
        )  # fmt: skip
        self._children: dict[tuple[str, str], Counter] = {}

    def prime(self, upstreams: Iterable[tuple[str, bool]]) -> None:
        """``(name, stores)`` for each upstream with a cache or a single flight (``stores``: with a cache)."""
        for name, stores in upstreams:
            for result in self.RESULTS:
                self._children[name, result] = self._results.labels(name, result)
            if stores:
                # For a memory-backed cache too (always 0 there): one query serves every upstream's panel.
                self._evictions.labels(name)
                self._backend_errors.labels(name)

    def cache_result(self, upstream: str, result: CacheOutcome) -> None:
        child = self._children.get((upstream, result))
        if child is None:
            child = self._children[upstream, result] = self._results.labels(upstream, result)
        child.inc()

    def cache_evicted(self, upstream: str, entries: int) -> None:
        self._evictions.labels(upstream).inc(entries)

    def cache_backend_error(self, upstream: str) -> None:
        self._backend_errors.labels(upstream).inc()


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
        for reason in ("missing", "invalid", "scope"):
            self._auth_failures.labels(reason)

    def prime(self, keys: Iterable[str]) -> None:
        for name in keys:
            self._rate_limited.labels(name)

    def auth_failed(self, reason: str) -> None:
        self._auth_failures.labels(reason).inc()

    def rate_limited(self, key: str) -> None:
        self._rate_limited.labels(key).inc()

    def jwks_fetched(self, outcome: str) -> None:
        self._jwks_fetches.labels(outcome).inc()

    def backend_error(self) -> None:
        self._backend_errors.inc()
