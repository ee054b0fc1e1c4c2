"""Retries, retry budget and circuit breakers against real upstream servers."""

from __future__ import annotations

import asyncio
import itertools
import time

import aiohttp

from tests.aggregate.conftest import post_aggregate, upstream_cfg
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import Behavior, UpstreamServer


async def test_transient_failures_are_retried_with_backoff(upstream: UpstreamServer) -> None:
    upstream.set("/flaky", Behavior(statuses=[503, 502], json={"finally": True}))
    cfg = upstream_cfg(upstream.url, retry={"attempts": 3, "backoff_initial_ms": 40, "backoff_max_ms": 200})
    async with running_gateway(make_settings(upstreams={"a": cfg})) as gw, aiohttp.ClientSession() as client:
        status, body, _ = await post_aggregate(client, gw.url, {"f": {"upstream": "a", "path": "/flaky"}})
    result = body["results"]["f"]
    assert status == 200
    assert result["ok"] is True
    assert result["data"] == {"finally": True}
    assert result["attempts"] == 3
    starts = [r.started for r in upstream.requests]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # Full jitter: each wait is in [0, 40 ms] then [0, 80 ms] (plus scheduling), never more.
    assert gaps[0] < 0.04 + 0.03
    assert gaps[1] < 0.08 + 0.03


async def test_failure_after_all_attempts_names_them(upstream: UpstreamServer) -> None:
    upstream.set("/down", Behavior(status=503))
    cfg = upstream_cfg(upstream.url, retry={"attempts": 3})
    async with running_gateway(make_settings(upstreams={"inventory": cfg})) as gw, aiohttp.ClientSession() as client:
        _, body, _ = await post_aggregate(client, gw.url, {"s": {"upstream": "inventory", "path": "/down"}})
    result = body["results"]["s"]
    assert result["error"] == {"type": "upstream_status", "message": "inventory answered 503 after 3 attempts"}
    assert result["attempts"] == 3
    assert result["status"] == 503
    assert upstream.count("/down") == 3


async def test_post_is_never_retried(upstream: UpstreamServer) -> None:
    upstream.set("/orders", Behavior(status=503))
    async with (
        running_gateway(make_settings(upstreams={"a": upstream_cfg(upstream.url)})) as gw,
        aiohttp.ClientSession() as client,
    ):
        source = {"upstream": "a", "path": "/orders", "method": "POST", "json": {"sku": "A1"}}
        _, body, _ = await post_aggregate(client, gw.url, {"p": source})
    assert body["results"]["p"]["attempts"] == 1
    assert upstream.count("/orders") == 1
    assert upstream.requests[0].body == b'{"sku":"A1"}'


async def test_retries_stop_at_the_deadline(upstream: UpstreamServer) -> None:
    upstream.set("/down", Behavior(status=503, latency=0.05))
    cfg = upstream_cfg(upstream.url, retry={"attempts": 10, "backoff_initial_ms": 100, "backoff_max_ms": 100})
    async with running_gateway(make_settings(upstreams={"a": cfg})) as gw, aiohttp.ClientSession() as client:
        started = time.perf_counter()
        _, body, _ = await post_aggregate(client, gw.url, {"d": {"upstream": "a", "path": "/down"}}, deadline_ms=250)
        elapsed = time.perf_counter() - started
    result = body["results"]["d"]
    assert result["ok"] is False
    assert 1 <= result["attempts"] < 10
    assert upstream.count("/down") == result["attempts"]
    assert elapsed < 0.6  # the deadline is 250 ms; the margin absorbs a loaded 2-core machine


async def test_retry_after_is_honoured(upstream: UpstreamServer) -> None:
    upstream.set("/limited", Behavior(statuses=[429], headers={"Retry-After": "0.3"}, json={"ok": 1}))
    cfg = upstream_cfg(upstream.url, retry={"attempts": 2, "backoff_initial_ms": 1, "backoff_max_ms": 1})
    async with running_gateway(make_settings(upstreams={"a": cfg})) as gw, aiohttp.ClientSession() as client:
        _, body, _ = await post_aggregate(
            client, gw.url, {"l": {"upstream": "a", "path": "/limited"}}, deadline_ms=2000
        )
        assert body["results"]["l"]["ok"] is True
        first, second = upstream.requests
        assert second.started - first.started >= 0.29
        # A Retry-After beyond the deadline is not waited for: the failure is reported at once.
        upstream.set("/limited", Behavior(status=429, headers={"Retry-After": "5"}))
        started = time.perf_counter()
        _, body, _ = await post_aggregate(
            client, gw.url, {"l": {"upstream": "a", "path": "/limited"}}, deadline_ms=1000
        )
        assert time.perf_counter() - started < 0.5
    assert body["results"]["l"]["error"]["type"] == "upstream_status"
    assert body["results"]["l"]["attempts"] == 1


async def test_retry_budget_limits_a_retry_storm(upstream: UpstreamServer) -> None:
    upstream.set("/down", Behavior(status=503))
    cfg = upstream_cfg(
        upstream.url,
        retry={
            "attempts": 3,
            "backoff_initial_ms": 1,
            "backoff_max_ms": 1,
            "budget_ratio": 0.1,
            "budget_min_retries": 2,
        },
        breaker={"consecutive_failures": 1000, "min_calls": 1000},
    )
    async with running_gateway(make_settings(upstreams={"a": cfg})) as gw, aiohttp.ClientSession() as client:
        for _ in range(20):
            await post_aggregate(client, gw.url, {"d": {"upstream": "a", "path": "/down"}})
        _, body, _ = await post_aggregate(client, gw.url, {"d": {"upstream": "a", "path": "/down"}})
    # 21 calls: retries allowed = max(2, 10 % of calls) = 2, so 23 requests in all rather than 63.
    assert upstream.count("/down") == 23
    assert "retry budget exhausted" in body["results"]["d"]["error"]["message"]


async def test_breaker_opens_fails_fast_half_opens_and_closes(upstream: UpstreamServer) -> None:
    upstream.set("/svc", Behavior(status=503))
    cfg = upstream_cfg(
        upstream.url,
        retry={"attempts": 1},
        breaker={"consecutive_failures": 3, "open_ms": 300, "half_open_probes": 1},
    )
    async with running_gateway(make_settings(upstreams={"a": cfg})) as gw, aiohttp.ClientSession() as client:
        breaker = gw.state.upstreams.upstreams["a"].breaker
        source = {"s": {"upstream": "a", "path": "/svc"}}
        for _ in range(3):
            _, body, _ = await post_aggregate(client, gw.url, source)
            assert body["results"]["s"]["error"]["type"] == "upstream_status"
        assert breaker.state.name == "OPEN"
        started = time.perf_counter()
        _, body, _ = await post_aggregate(client, gw.url, source)
        assert time.perf_counter() - started < 0.1
        assert body["results"]["s"]["error"]["type"] == "circuit_open"
        assert body["results"]["s"]["attempts"] == 0
        assert upstream.count("/svc") == 3  # nothing was sent while open

        # After open_ms the breaker lets one probe through; it fails, so the breaker opens again.
        deadline = time.monotonic() + 2
        while breaker.state.name != "HALF_OPEN":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        _, body, _ = await post_aggregate(client, gw.url, source)
        assert body["results"]["s"]["error"]["type"] == "upstream_status"
        assert breaker.state.name == "OPEN"
        assert upstream.count("/svc") == 4

        # The upstream recovers: the next probe succeeds and closes the breaker.
        upstream.set("/svc", Behavior(json={"up": True}))
        deadline = time.monotonic() + 2
        while breaker.state.name != "HALF_OPEN":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        _, body, _ = await post_aggregate(client, gw.url, source)
        assert body["results"]["s"]["data"] == {"up": True}
        assert breaker.state.name == "CLOSED"


async def test_half_open_admits_a_bounded_number_of_probes(upstream: UpstreamServer) -> None:
    upstream.set("/svc", Behavior(status=503))
    cfg = upstream_cfg(
        upstream.url, retry={"attempts": 1}, breaker={"consecutive_failures": 1, "open_ms": 100, "half_open_probes": 2}
    )
    async with running_gateway(make_settings(upstreams={"a": cfg})) as gw, aiohttp.ClientSession() as client:
        breaker = gw.state.upstreams.upstreams["a"].breaker
        await post_aggregate(client, gw.url, {"s": {"upstream": "a", "path": "/svc"}})
        assert breaker.state.name == "OPEN"
        upstream.set("/svc", Behavior(latency=0.2, json={}))
        deadline = time.monotonic() + 2
        while breaker.state.name != "HALF_OPEN":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        upstream.reset_stats()
        sources = {f"s{i}": {"upstream": "a", "path": "/svc"} for i in range(5)}
        _, body, _ = await post_aggregate(client, gw.url, sources)
    kinds = sorted(("ok" if r["ok"] else r["error"]["type"], r["attempts"]) for r in body["results"].values())
    assert kinds == [("circuit_open", 0)] * 3 + [("ok", 1)] * 2
    assert upstream.count("/svc") == 2
