"""/metrics under real load: each metric moves as it should. Parsed with prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.aggregate.conftest import post_aggregate, upstream_cfg
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import Behavior, UpstreamServer

CONTRACT = Path(__file__).parents[2] / "docs" / "metrics.md"


def contract_names() -> set[str]:
    return set(re.findall(r"^\| `(gateway_[a-z_]+)` \|", CONTRACT.read_text(), flags=re.MULTILINE))


async def scrape(client: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with client.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family
    return families


def value(families: dict[str, Any], name: str, **labels: str) -> float:
    for family in families.values():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise KeyError(f"{name}{labels} not exported")


async def test_every_contract_metric_is_exported(upstream: UpstreamServer, pg_dsn: str) -> None:
    upstream.set("/x", Behavior())
    settings = make_settings(
        database_url=pg_dsn,
        # "pool": several endpoints (one address standing in for a service name), per-endpoint series on.
        upstreams={
            "a": upstream_cfg(upstream.url),
            "pool": upstream_cfg(f"http://a.internal:{upstream.port}", endpoints=[upstream.url]),
        },
        queries={"one": {"sql": "SELECT 1 AS one"}},
        compute={"enabled": True, "workers": 1},
        observability={"endpoint_metrics": True},
    )
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        await post_aggregate(client, gw.url, {"u": {"upstream": "a", "path": "/x"}, "q": {"query": "one"}})
        families = await scrape(client, gw.url)
    exported = set(families)
    # Counters are listed in the contract with their `_total` suffix; the parser names the family without it.
    missing = {n for n in contract_names() if n not in exported and n.removesuffix("_total") not in exported}
    assert not missing, f"in docs/metrics.md but not exported: {sorted(missing)}"
    assert value(families, "gateway_ready") == 1
    assert value(families, "gateway_draining") == 0
    assert value(families, "gateway_db_executor_capacity") == 4
    assert value(families, "gateway_upstream_limit", upstream="a") == 8
    assert value(families, "gateway_http_requests_total", route="/aggregate", method="POST", status="200") == 1
    assert value(families, "gateway_db_query_duration_seconds_count", query="one", outcome="ok") == 1
    assert value(families, "gateway_upstream_request_duration_seconds_count", upstream="a", outcome="ok") == 1
    assert "process_cpu_seconds" in exported
    assert "python_gc_objects_collected" in exported


async def test_slow_queries_saturate_the_db_executor(pg_dsn: str) -> None:
    settings = make_settings(
        database_url=pg_dsn,
        database={"executor_threads": 2, "queue_limit": 2, "min_connections": 1},
        queries={"sleep": {"sql": "SELECT pg_sleep(%(s)s)", "params": {"s": "float"}}},
        limits={"default_deadline_ms": 8000},
    )
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        sources = {f"s{i}": {"query": "sleep", "params": {"s": 1.5}} for i in range(5)}
        load = asyncio.create_task(post_aggregate(client, gw.url, sources))
        deadline = time.monotonic() + 5
        # Both threads hold their connection (a thread counts as busy a moment before it has one) and two wait.
        while gw.state.db.executor.stats().queued < 2 or gw.state.db.pool_stats()["in_use"] < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        during = await scrape(client, gw.url)
        _, body, _ = await load
        after = await scrape(client, gw.url)
    assert value(during, "gateway_db_executor_busy") == value(during, "gateway_db_executor_capacity") == 2
    assert value(during, "gateway_db_executor_queued") == 2
    assert value(during, "gateway_db_pool_connections", state="in_use") == 2
    assert value(after, "gateway_db_executor_rejected_total") == 1
    assert value(after, "gateway_db_executor_queue_wait_seconds_count") == 4 + 1  # and the start-up warm-up
    assert value(after, "gateway_db_executor_queued") == 0
    assert [r["error"]["type"] for r in body["results"].values() if not r["ok"]] == ["overloaded"]


def block_the_loop_for_a_while() -> None:
    time.sleep(0.3)


async def test_blocking_callback_is_detected_and_named(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="app.observability.blocking")
    settings = make_settings(observability={"blocking_threshold_ms": 100, "loop_lag_interval_ms": 20})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        await asyncio.sleep(0.05)
        block_the_loop_for_a_while()
        await asyncio.sleep(0.05)
        families = await scrape(client, gw.url)
    warnings = [r for r in caplog.records if getattr(r, "event", None) == "loop_blocked"]
    assert len(warnings) == 1
    assert warnings[0].function == "block_the_loop_for_a_while"  # type: ignore[attr-defined]
    assert any("test_metrics.py" in frame for frame in warnings[0].stack)  # type: ignore[attr-defined]
    assert value(families, "gateway_event_loop_blocked_total") == 1
    assert value(families, "gateway_event_loop_lag_max_seconds") >= 0.25
    assert value(families, "gateway_event_loop_lag_seconds_bucket", le="0.25") < value(
        families, "gateway_event_loop_lag_seconds_count"
    )


async def test_failing_upstream_opens_its_breaker(upstream: UpstreamServer) -> None:
    upstream.set("/down", Behavior(status=503))
    cfg = upstream_cfg(upstream.url, retry={"attempts": 2, "backoff_initial_ms": 1},
                       breaker={"consecutive_failures": 4, "open_ms": 60_000})  # fmt: skip
    async with running_gateway(make_settings(upstreams={"a": cfg})) as gw, aiohttp.ClientSession() as client:
        before = await scrape(client, gw.url)
        for _ in range(3):
            await post_aggregate(client, gw.url, {"d": {"upstream": "a", "path": "/down"}})
        after = await scrape(client, gw.url)
    assert value(before, "gateway_upstream_breaker_state", upstream="a") == 0
    assert value(after, "gateway_upstream_breaker_state", upstream="a") == 2
    assert value(after, "gateway_upstream_breaker_transitions_total", upstream="a", to="open") == 1
    assert value(after, "gateway_upstream_retries_total", upstream="a") == 2
    assert value(after, "gateway_upstream_request_duration_seconds_count", upstream="a", outcome="upstream_status") == 4
    # The third call is refused by the open breaker: not an attempt, but a refusal; all three answers are partial.
    assert value(before, "gateway_upstream_breaker_refused_total", upstream="a") == 0
    assert value(after, "gateway_upstream_breaker_refused_total", upstream="a") == 1
    assert value(before, "gateway_aggregate_answers_total", route="/aggregate", complete="false") == 0
    assert value(after, "gateway_aggregate_answers_total", route="/aggregate", complete="false") == 3
    assert value(after, "gateway_aggregate_answers_total", route="/aggregate", complete="true") == 0


async def test_label_sets_stay_bounded(upstream: UpstreamServer) -> None:
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:

        async def hit(i: int) -> None:
            async with client.get(f"{gw.url}/no/such/path/{i}?q={i}"):
                pass
            async with client.get(f"{gw.url}/aggregate/composite-{i}"):
                pass

        for batch in range(10):
            await asyncio.gather(*(hit(batch * 200 + i) for i in range(200)))
        families = await scrape(client, gw.url)
    samples = [s for s in families["gateway_http_requests"].samples if s.name == "gateway_http_requests_total"]
    routes = {s.labels["route"] for s in samples}
    assert routes == {"<unmatched>", "/aggregate/{composite}"}
    assert value(families, "gateway_http_requests_total", route="<unmatched>", method="other", status="404") == 2000
    assert len(samples) <= 3


async def test_metrics_can_move_to_the_admin_listener(upstream: UpstreamServer) -> None:
    settings = make_settings(observability={"admin_port": 0})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        admin_url = f"http://127.0.0.1:{gw.state.admin_port}"
        async with client.get(f"{gw.url}/metrics") as resp:
            assert resp.status == 404
        families = await scrape(client, admin_url)
        async with client.get(f"{admin_url}/metrics", headers={"Accept": "application/openmetrics-text"}) as resp:
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await resp.text()).rstrip().endswith("# EOF")
    assert value(families, "gateway_ready") == 1


async def test_request_log_line_has_the_source_summary(
    upstream: UpstreamServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.access")
    upstream.set("/ok", Behavior())
    upstream.set("/down", Behavior(status=503))
    settings = make_settings(
        upstreams={"a": upstream_cfg(upstream.url, retry={"attempts": 2, "backoff_initial_ms": 1})}
    )
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        await post_aggregate(
            client, gw.url, {"ok": {"upstream": "a", "path": "/ok"}, "down": {"upstream": "a", "path": "/down"}}
        )
    (line,) = [r for r in caplog.records if getattr(r, "route", None) == "/aggregate"]
    assert line.status == 200  # type: ignore[attr-defined]
    assert len(line.request_id) == 32  # type: ignore[attr-defined]
    sources = line.sources  # type: ignore[attr-defined]
    assert sources["ok"]["outcome"] == "ok"
    assert sources["down"] == {**sources["down"], "outcome": "upstream_status", "attempts": 2}


async def test_cpu_jobs_saturate_the_process_pool() -> None:
    settings = make_settings(compute={"enabled": True, "workers": 1, "queue_limit": 2, "job_timeout_s": 30})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:

        async def job() -> int:
            async with client.post(f"{gw.url}/transform/prime_count", json={"data": [3_000_000]}) as resp:
                await resp.read()
                return resp.status

        jobs = [asyncio.create_task(job()) for _ in range(4)]
        deadline = time.monotonic() + 10
        while gw.state.cpu.stats().waiting < 2:
            assert time.monotonic() < deadline, "the jobs never queued"
            await asyncio.sleep(0.01)
        during = await scrape(client, gw.url)
        statuses = sorted(await asyncio.gather(*jobs))
        after = await scrape(client, gw.url)
    assert value(during, "gateway_cpu_pool_busy") == value(during, "gateway_cpu_pool_capacity") == 1
    assert value(during, "gateway_cpu_pool_queued") == 2
    assert statuses == [200, 200, 200, 503]  # the fourth found the queue full
    assert value(after, "gateway_cpu_pool_rejected_total") == 1
    assert value(after, "gateway_cpu_pool_run_seconds_count") >= 3
    assert value(after, "gateway_cpu_pool_queue_wait_seconds_count") >= 3
    assert value(after, "gateway_cpu_pool_transfer_bytes_total", transport="pickle") > 0
