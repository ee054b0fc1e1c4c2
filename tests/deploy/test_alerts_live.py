"""The shipped alert rules and dashboard in a real Prometheus, scraping real `gateway serve` processes that call
real upstreams (issue 17).

One Prometheus (1 s scrape and evaluation intervals, deploy/prometheus/alerts.yml through ``shorten(FACTOR)``,
nothing else changed) scrapes, each under its own job:
  gateway-outage  three upstreams under paced load: u20 (20 req/s), u2 (2 req/s), req (the required source of a
                  composite, 4 req/s); all three then answer 500 until they heal
  gateway-db      a DB executor of 2 threads kept saturated by slow queries
  gateway-idle    a gateway with an upstream and a database that nobody calls: nothing may fire
  gateway-down    a port nobody listens on: GatewayDown
Everything is asserted through Prometheus' HTTP API (/api/v1/alerts, /api/v1/query), never by reading the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from app.settings import BreakerPolicy
from scripts.validate_deploy import ALERTS, DASHBOARD, dashboard_queries, substitute_grafana_variables
from tests.deploy.prometheus import (
    RANGE,
    AlertLog,
    PrometheusApi,
    alert_rule,
    for_seconds,
    prometheus_server,
    seconds,
    shorten,
    window_seconds,
)
from tests.faults.support import config, serve
from tests.support.net import free_port
from tests.support.upstream import Behavior, UpstreamServer

# Every duration of the rules divided by 20: 5m windows become 15 s, a 2m `for:` 6 s (tests/deploy/prometheus.py).
FACTOR = 20
# Scrapes (and evaluations) an alert may take beyond what its rule asks: a scrape to see the change, an evaluation
# to act on it, the poll of /api/v1/alerts, and a loaded machine.
SLACK_S = 5.0
# The breakers run with the gateway's defaults, not shortened: open for 5 s, opened by 5 consecutive failures
# (2.5 s of an outage at 2 req/s).
OPEN_S = BreakerPolicy().open_ms / 1000
OPENS_AFTER = BreakerPolicy().consecutive_failures
RATES = {"u20": 20.0, "u2": 2.0}  # requests per second to each upstream under test
POLL_S = 0.25
PATH = "/x"
UPSTREAM_ALERTS = ("GatewayUpstreamBreakerOpen", "GatewayUpstreamErrorRateHigh")


@dataclass(frozen=True)
class Stack:
    prometheus: str
    rules: str  # the shortened rules Prometheus loaded
    outage: str  # gateway URLs
    db: str
    idle: str
    upstreams: dict[str, UpstreamServer]


@pytest.fixture(scope="module")
def stack(pg_dsn: str) -> Iterator[Stack]:
    rules = shorten(ALERTS.read_text(), FACTOR)
    with tempfile.TemporaryDirectory(prefix="alerts-live-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        ups = {name: stack.enter_context(UpstreamServer(name)) for name in ("u20", "u2", "req", "idle_up")}
        for up in ups.values():
            up.set(PATH, Behavior())
        outage = stack.enter_context(
            serve(
                workdir,
                config(
                    upstreams={name: {"base_url": ups[name].url} for name in ("u20", "u2", "req")},
                    composites={"needs": {"sources": {"r": {"upstream": "req", "path": PATH, "required": True}}}},
                    compute={"enabled": True, "workers": 1},
                ),
            )
        )
        db = stack.enter_context(
            serve(
                workdir,
                config(
                    database_url=pg_dsn,
                    database={"executor_threads": 2, "queue_limit": 32, "min_connections": 1},
                    queries={"slow": {"sql": "SELECT pg_sleep(0.2)", "timeout_ms": 5000}},
                ),
            )
        )
        idle = stack.enter_context(
            serve(
                workdir,
                config(
                    database_url=pg_dsn,
                    upstreams={
                        # With a cache: its series exist (at 0) for the dashboard's cache panels.
                        "idle_up": {"base_url": ups["idle_up"].url, "cache": {"enabled": True}},
                        # An upstream with several endpoints (one address standing in for a service name), with
                        # its per-endpoint series on, for the dashboard's endpoint panels.
                        "idle_pool": {
                            "base_url": f"http://idle.internal:{ups['idle_up'].port}",
                            "endpoints": [ups["idle_up"].url],
                        },
                    },
                    observability={"endpoint_metrics": True},
                    queries={"one": {"sql": "SELECT 1 AS one"}},
                ),
            )
        )
        jobs = {
            "gateway-outage": outage.url.removeprefix("http://"),
            "gateway-db": db.url.removeprefix("http://"),
            "gateway-idle": idle.url.removeprefix("http://"),
            "gateway-down": f"127.0.0.1:{free_port()}",
        }
        prom = stack.enter_context(prometheus_server(workdir, rules, jobs))
        yield Stack(prom.url, rules, outage.url, db.url, idle.url, ups)


async def paced(
    http: aiohttp.ClientSession, method: str, url: str, rate: float, stop: asyncio.Event, **kw: Any
) -> None:
    """``rate`` requests per second whatever their latency (an open loop, as many independent clients send)."""
    loop = asyncio.get_running_loop()

    async def one() -> None:
        async with http.request(method, url, **kw) as resp:
            await resp.read()

    next_at = loop.time()
    async with asyncio.TaskGroup() as tg:
        while not stop.is_set():
            tg.create_task(one())
            next_at += 1 / rate
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - loop.time()))


async def closed_loop(http: aiohttp.ClientSession, url: str, body: Any, concurrency: int, stop: asyncio.Event) -> None:
    async def worker() -> None:
        while not stop.is_set():
            async with http.post(url, json=body) as resp:
                await resp.read()

    async with asyncio.TaskGroup() as tg:
        for _ in range(concurrency):
            tg.create_task(worker())


async def watch_alerts(prom: PrometheusApi, log: AlertLog, changed: asyncio.Event, stop: asyncio.Event) -> None:
    while not stop.is_set():
        log.add(await prom.alerts())
        changed.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), POLL_S)


def _since(start: float, at: float | None) -> str:
    return "never" if at is None else f"{at - start:.1f} s"


async def until(changed: asyncio.Event, condition: Callable[[], bool], within: float, what: str) -> None:
    """Wait for ``condition`` (re-checked at each poll of Prometheus); TimeoutError naming ``what``."""
    try:
        async with asyncio.timeout(within):
            while not condition():
                changed.clear()
                await changed.wait()
    except TimeoutError:
        raise TimeoutError(f"{what} within {within:.0f} s") from None


async def until_query(prom: PrometheusApi, expr: str, within: float) -> None:
    """Wait until ``expr`` returns a series (a comparison that holds)."""
    # The condition lives in Prometheus: nothing to wait on but the next poll.
    async with asyncio.timeout(within):
        while True:
            if await prom.query(expr):
                return
            await asyncio.sleep(POLL_S)


def aggregate_body(source: dict[str, Any]) -> dict[str, Any]:
    return {"sources": {"s": source}, "deadline_ms": 5000}


async def test_every_dashboard_query_returns_a_series(stack: Stack) -> None:
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
        # A short load through every execution model: an upstream call, a composite, a query, a transform.
        for _ in range(5):
            for method, url, body in (
                ("POST", f"{stack.outage}/aggregate", aggregate_body({"upstream": "u20", "path": PATH})),
                ("GET", f"{stack.outage}/aggregate/needs", None),
                ("POST", f"{stack.outage}/transform/trig_log", {"data": [1.0, 2.0]}),
                ("POST", f"{stack.db}/aggregate", aggregate_body({"query": "slow"})),
            ):
                async with http.request(method, url, json=body) as resp:
                    assert resp.status == 200, await resp.text()
        loaded = time.monotonic()
        prom = PrometheusApi(stack.prometheus, http)
        # The three gateways scraped twice since, so that a series the load created has the two samples rate()
        # needs (the window, whole seconds since the load, never reaches back before it); the idle one carries the
        # cache and endpoint series, which exist from its start.
        async with asyncio.timeout(20):
            while True:
                since = f"{int(time.monotonic() - loaded)}s"
                if since != "0s" and await prom.query(
                    f'min(count_over_time(up{{job=~"gateway-outage|gateway-db|gateway-idle"}}[{since}])) >= 2'
                ):
                    break
                await asyncio.sleep(POLL_S)
        empty = []
        for title, expr in queries:
            if not await prom.query(substitute_grafana_variables(expr)):
                empty.append(f"{title}: {expr}")
    assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)


@pytest.mark.slow
@pytest.mark.timeout(170)
async def test_alerts_fire_through_a_real_outage_and_resolve_when_it_heals(stack: Stack) -> None:
    expected_upstream = [(name, {"job": "gateway-outage", "upstream": up}) for name in UPSTREAM_ALERTS
                         for up in RATES]  # fmt: skip
    # Symptoms of the same outage, and the scenarios beside it: each must fire at some point.
    expected_other = [
        ("GatewayRequiredSourceFailing", {"job": "gateway-outage"}),
        ("GatewayAggregatePartialAnswers", {"job": "gateway-outage", "route": "/aggregate"}),
        ("GatewayHttp5xxRatioHigh", {"job": "gateway-outage"}),
        ("GatewayDbExecutorSaturated", {"job": "gateway-db"}),
        ("GatewayDown", {"job": "gateway-down"}),
    ]
    problems: list[str] = []
    log = AlertLog()
    changed, stop = asyncio.Event(), asyncio.Event()

    def firing(name: str, labels: dict[str, str]) -> Callable[[], bool]:
        return lambda: (
            bool(log.samples) and any(a.matches(name, labels) and a.state == "firing" for a in log.samples[-1][1])
        )

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
        prom = PrometheusApi(stack.prometheus, http)
        started = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            loads: list[Coroutine[Any, Any, None]] = [
                *(paced(http, "POST", f"{stack.outage}/aggregate", rate, stop,
                        json=aggregate_body({"upstream": up, "path": PATH})) for up, rate in RATES.items()),
                paced(http, "GET", f"{stack.outage}/aggregate/needs", 4, stop),
                closed_loop(http, f"{stack.db}/aggregate", aggregate_body({"query": "slow"}), 6, stop),
                watch_alerts(prom, log, changed, stop),
            ]  # fmt: skip
            for load in loads:
                tg.create_task(load)
            try:
                # Healthy traffic first, until the longest 5-minute window (shortened) holds nothing else.
                healthy = int(seconds("5m") / FACTOR)
                scraped = f'count_over_time(up{{job="gateway-outage"}}[{healthy}s]) >= {healthy}'
                await until_query(prom, scraped, within=healthy + 15)
                outage_at = time.monotonic()
                for name in ("u20", "u2", "req"):
                    stack.upstreams[name].set(PATH, Behavior(status=500))
                with contextlib.suppress(TimeoutError):
                    await until(changed, lambda: all(firing(n, lb)() for n, lb in expected_upstream + expected_other),
                                within=60, what="every expected alert firing")  # fmt: skip
                # Keep the outage on through at least three of the breaker's open periods after the breaker alerts
                # fired, each ending in a half-open reading or a failed probe.
                fired = [log.first(n, lb, after=outage_at) for n, lb in expected_upstream]
                hold_until = max([outage_at, *(f for f in fired if f is not None)]) + 3 * OPEN_S
                with contextlib.suppress(TimeoutError):
                    await until(changed, lambda: time.monotonic() >= hold_until, within=3 * OPEN_S + 5, what="hold")
                healed_at = time.monotonic()
                for name in ("u20", "u2", "req"):
                    stack.upstreams[name].set(PATH, Behavior())
                with contextlib.suppress(TimeoutError):
                    await until(changed, lambda: all(log.gone(n, lb, after=healed_at) for n, lb in expected_upstream),
                                within=OPEN_S + 15 + 2 * SLACK_S, what="resolved")  # fmt: skip
                resolved_at = time.monotonic()
            finally:
                stop.set()

    timings = []
    for name, labels in expected_upstream:
        rule = alert_rule(stack.rules, name)
        fired_at = log.first(name, labels, after=outage_at)
        gone_at = log.gone(name, labels, after=healed_at)
        timings.append(f"{name} {labels['upstream']}: fired after {_since(outage_at, fired_at)}, "
                       f"gone {_since(healed_at, gone_at)} after the upstream healed")  # fmt: skip
        # Its `for:` counts from the first failures (the failure ratio) or from the breaker opening, which takes
        # OPENS_AFTER failed calls.
        fire_by = OPENS_AFTER / RATES[labels["upstream"]] + for_seconds(rule) + SLACK_S
        if fired_at is None:
            problems.append(f"{name} {labels} never fired during the outage (rule: {rule['expr'].strip()})")
            continue
        if fired_at - outage_at > fire_by:
            problems.append(f"{name} {labels} fired {fired_at - outage_at:.1f} s into the outage, not within its "
                            f"for: plus {SLACK_S:.0f} s ({fire_by:.1f} s)")  # fmt: skip
        gaps = log.not_firing_between(name, labels, fired_at, healed_at)
        if gaps:
            problems.append(f"{name} {labels} stopped firing while the upstream was still down, "
                            f"{gaps[0] - outage_at:.1f} s into the outage ({len(gaps)} polls)")  # fmt: skip
        resolve_by = OPEN_S + window_seconds(rule) + SLACK_S
        if gone_at is None or gone_at - healed_at > resolve_by:
            problems.append(f"{name} {labels} still active {resolve_by:.0f} s after the upstream healed")
    for name, labels in expected_other:
        if log.first(name, labels, after=started) is None:
            problems.append(f"{name} {labels} never fired")
    early = log.active(lambda a: a.labels.get("job") == "gateway-outage", end=outage_at)
    if early:
        problems.append(f"active under healthy load, before the outage: {sorted(early)}")
    idle = log.active(lambda a: a.labels.get("job") == "gateway-idle")
    if idle:
        problems.append(f"active on the idle gateway: {sorted(idle)}")
    print(f"\noutage at {outage_at - started:.1f} s, healed at {healed_at - started:.1f} s, "
          f"resolved at {resolved_at - started:.1f} s", *timings, sep="\n")  # fmt: skip
    assert not problems, "\n".join(problems)


def test_shorten_changes_durations_only() -> None:
    text = ALERTS.read_text()
    short = shorten(text, FACTOR)
    before = [r for g in yaml.safe_load(text)["groups"] for r in g["rules"]]
    after = [r for g in yaml.safe_load(short)["groups"] for r in g["rules"]]
    assert len(before) == len(after)
    for old, new in zip(before, after, strict=True):
        assert {k: v for k, v in old.items() if k not in ("for", "expr")} == {
            k: v for k, v in new.items() if k not in ("for", "expr")
        }
        if "for" in old:
            assert seconds(new["for"]) * FACTOR == seconds(old["for"])
        assert RANGE.sub("[]", new["expr"]) == RANGE.sub("[]", old["expr"])
        assert [seconds(m.group(1)) * FACTOR for m in RANGE.finditer(new["expr"])] == [
            seconds(m.group(1)) for m in RANGE.finditer(old["expr"])
        ]
    assert shorten("groups: [{name: g, rules: [{alert: A, expr: 'rate(x[5m:1m]) > 0', for: 10m}]}]", 20) == (
        "groups:\n- name: g\n  rules:\n  - alert: A\n    expr: rate(x[15s:3s]) > 0\n    for: 30s\n"
    )
    with pytest.raises(ValueError, match="offset"):
        shorten("groups: [{name: g, rules: [{alert: A, expr: 'rate(x[5m] offset 1m) > 0'}]}]", 20)
