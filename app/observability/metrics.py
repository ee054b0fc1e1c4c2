"""The gateway's Prometheus registry and the metrics that hooks and middleware update."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app import __version__

LOOP_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        Gauge("gateway_build_info", "Build information.", ["version"], registry=r).labels(__version__).set(1)
        self.loop_lag = Histogram(
            "gateway_event_loop_lag_seconds", "How late the loop ran a timer.", buckets=LOOP_LAG_BUCKETS, registry=r
        )
        self.requests = Counter(
            "gateway_http_requests_total", "HTTP requests answered.", ["route", "method", "status"], registry=r
        )
        self.request_latency = Histogram(
            "gateway_http_request_duration_seconds",
            "HTTP request latency.",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)


class CallbackGauges(Collector):
    """Gauges read at scrape time from live objects (pool sizes, queue depths): never stale, no bookkeeping."""

    def __init__(self, gauges: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        for name, (doc, read) in self._gauges.items():
            yield GaugeMetricFamily(name, doc, value=float(read()))
