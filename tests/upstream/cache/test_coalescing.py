"""Single flight through a real gateway: concurrent identical calls from many requests share one upstream call,
and no waiter's cancellation or shorter deadline hurts the others. The upstream holds its answer behind a gate
until every waiter is known to be waiting (read from the gateway's own gauge), so nothing depends on timing."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from tests.support.gateway import RunningGateway, make_settings, running_gateway
from tests.support.upstream import Behavior, Gate, UpstreamServer
from tests.upstream.cache.conftest import cache_metric, cached_cfg, source


async def waiting(gw: RunningGateway, n: int) -> None:
    """Until ``n`` calls wait on the upstream's flight (the gauge the gateway exports), for 10 s at most."""
    deadline = time.monotonic() + 10
    while (now := cache_metric(gw, "gateway_upstream_cache_flight_waiters", upstream="u")) != n:
        assert time.monotonic() < deadline, f"{now} waiters, not {n}"
        await asyncio.sleep(0.005)


async def test_fifty_concurrent_identical_calls_make_one_upstream_call(upstream: UpstreamServer) -> None:
    gate = Gate()
    upstream.set("/item", Behavior(json={"v": 7}, headers={"Cache-Control": "max-age=60"}, gate=gate))
    cfg = cached_cfg(upstream.url, max_concurrency=64)
    settings = make_settings(upstreams={"u": cfg}, limits={"default_deadline_ms": 10_000})
    connector = aiohttp.TCPConnector(limit=100)
    async with running_gateway(settings) as gw, aiohttp.ClientSession(connector=connector) as client:
        calls = [asyncio.create_task(source(client, gw)) for _ in range(50)]
        try:
            await waiting(gw, 50)
        finally:
            gate.open()
        results = await asyncio.gather(*calls)
        assert upstream.count("/item") == 1
        assert sorted(r["cache"] for r in results) == ["coalesced"] * 49 + ["miss"]
        assert all(r["ok"] and r["data"] == {"v": 7} for r in results)
        assert sorted(r["attempts"] for r in results) == [0] * 49 + [1]  # only the leader sent anything
        assert (await source(client, gw))["cache"] == "hit"
        assert cache_metric(gw, "gateway_upstream_cache_flights", upstream="u") == 0


async def test_a_cancelled_waiter_never_cancels_the_shared_call(upstream: UpstreamServer) -> None:
    """The leader's client goes away and a third waiter's deadline passes: the other waiter still gets the answer,
    the deadline is reported on time, and the upstream's connection was never closed."""
    gate = Gate()
    upstream.set("/item", Behavior(json={"v": 1}, headers={"Cache-Control": "max-age=60"}, gate=gate))
    settings = make_settings(upstreams={"u": cached_cfg(upstream.url)}, limits={"default_deadline_ms": 10_000})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        leader = asyncio.create_task(source(client, gw))
        try:
            await waiting(gw, 1)
            await upstream.await_requests(1)
            follower = asyncio.create_task(source(client, gw))
            await waiting(gw, 2)
            leader.cancel()  # its client disconnects: the gateway cancels that request's sources
            await asyncio.gather(leader, return_exceptions=True)
            await waiting(gw, 1)
            started = time.monotonic()
            short = await source(client, gw, deadline_ms=150)
            took = time.monotonic() - started
            assert (short["ok"], short["error"]["type"], short["cache"]) == (False, "deadline", "coalesced")
            assert 0.14 <= took < 1.0, f"the short deadline was reported after {took:.3f} s"
            await waiting(gw, 1)
        finally:
            gate.open()
        result = await follower
        assert (result["ok"], result["data"], result["cache"]) == (True, {"v": 1}, "coalesced")
        assert upstream.count("/item") == 1
        await upstream.await_requests(1)
        assert not upstream.requests[0].disconnected  # the shared call ran to its end
        assert (await source(client, gw))["cache"] == "hit"  # and its answer was stored


async def test_the_call_is_cancelled_when_every_waiter_is_gone(upstream: UpstreamServer) -> None:
    gate = Gate()
    upstream.set("/item", Behavior(gate=gate))
    settings = make_settings(upstreams={"u": cached_cfg(upstream.url)}, limits={"default_deadline_ms": 10_000})
    try:
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
            calls = [asyncio.create_task(source(client, gw)) for _ in range(3)]
            await waiting(gw, 3)
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            await upstream.await_disconnects(1)  # nobody wanted the answer any more: its connection was closed
            await waiting(gw, 0)
            assert cache_metric(gw, "gateway_upstream_cache_flights", upstream="u") == 0
    finally:
        gate.open()


async def test_a_waiter_with_a_later_deadline_calls_again_when_the_leaders_runs_out(upstream: UpstreamServer) -> None:
    gate = Gate()
    upstream.set("/item", Behavior(json={"v": 2}, gate=gate))
    cfg: dict[str, Any] = cached_cfg(upstream.url, {"default_ttl_s": 60}, timeout_ms=10_000)
    settings = make_settings(upstreams={"u": cfg})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        try:
            hasty = asyncio.create_task(source(client, gw, deadline_ms=300))
            await waiting(gw, 1)
            patient = asyncio.create_task(source(client, gw, deadline_ms=8000))
            await waiting(gw, 2)
            assert (await hasty)["error"]["type"] == "deadline"
            # The shared call ended at the leader's deadline; the patient waiter leads a call of its own.
            await upstream.await_requests(2)
        finally:
            gate.open()
        result = await patient
        assert (result["ok"], result["data"]) == (True, {"v": 2})
        assert upstream.count("/item") == 2
