"""Stale-if-error through a real gateway: an expired entry stands in while its upstream fails (5xx, down, its
breaker open), within stale_if_error_s past expiry, and the source says so."""

from __future__ import annotations

import time
from typing import Any

import aiohttp

from tests.support.gateway import RunningGateway, make_settings, running_gateway
from tests.support.upstream import Behavior, UpstreamServer
from tests.upstream.cache.conftest import cached_cfg, source

TTL_S = 0.2


async def until_expired(client: aiohttp.ClientSession, gw: RunningGateway, path: str = "/item") -> dict[str, Any]:
    """Call until the entry is no longer fresh; that call's result."""
    deadline = time.monotonic() + 5
    while True:
        result = await source(client, gw, path)
        if result["cache"] != "hit":
            return result
        assert time.monotonic() < deadline, "the entry never expired"


def cfg(url: str, **overrides: Any) -> dict[str, Any]:
    return cached_cfg(url, {"default_ttl_s": TTL_S, "stale_if_error_s": 60}, **overrides)


async def test_a_failing_upstream_is_stood_in_for_then_its_open_breaker(upstream: UpstreamServer) -> None:
    upstream.set("/item", Behavior(json={"v": "old"}))
    breaker = {"consecutive_failures": 1, "open_ms": 60_000}
    settings = make_settings(upstreams={"u": cfg(upstream.url, breaker=breaker)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        assert (await source(client, gw))["cache"] == "miss"
        upstream.set("/item", Behavior(status=503))
        stale = await until_expired(client, gw)
        assert (stale["ok"], stale["cache"], stale["data"], stale["error"]) == (True, "stale", {"v": "old"}, None)
        assert stale["attempts"] == 1  # the upstream was asked, and failed
        assert upstream.count("/item") == 2
        # One failure opened the breaker: nothing is sent now, and the entry still stands in.
        refused = await source(client, gw)
        assert (refused["ok"], refused["cache"], refused["attempts"]) == (True, "stale", 0)
        assert upstream.count("/item") == 2


async def test_an_upstream_that_is_down_is_stood_in_for() -> None:
    with UpstreamServer("down") as upstream:
        upstream.set("/item", Behavior(json={"v": "kept"}))
        settings = make_settings(upstreams={"u": cfg(upstream.url)})
        async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
            assert (await source(client, gw))["cache"] == "miss"
            upstream.stop()
            stale = await until_expired(client, gw)
            assert (stale["ok"], stale["cache"], stale["data"]) == (True, "stale", {"v": "kept"})


async def test_a_timeout_is_stood_in_for(upstream: UpstreamServer) -> None:
    upstream.set("/item", Behavior(json={"v": "kept"}))
    settings = make_settings(upstreams={"u": cfg(upstream.url, timeout_ms=100)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        assert (await source(client, gw))["cache"] == "miss"
        upstream.set("/item", Behavior(mode="hang"))
        stale = await until_expired(client, gw)
        assert (stale["ok"], stale["cache"], stale["data"]) == (True, "stale", {"v": "kept"})


async def test_no_stand_in_past_the_window_for_a_client_error_or_when_revalidation_is_required(
    upstream: UpstreamServer,
) -> None:
    upstream.set("/item", Behavior(json={"v": 1}))
    upstream.set("/strict", Behavior(json={"v": 1}, headers={"Cache-Control": "max-age=1, must-revalidate"}))
    short = cached_cfg(upstream.url, {"default_ttl_s": TTL_S, "stale_if_error_s": 0.1})
    settings = make_settings(upstreams={"u": short, "w": cfg(upstream.url)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        assert (await source(client, gw))["cache"] == "miss"
        assert (await source(client, gw, "/strict", upstream="w"))["cache"] == "miss"
        upstream.set("/item", Behavior(status=404))
        # A 404 is the upstream answering, not failing: never stood in for.
        not_found = await source(client, gw, upstream="w")
        assert not_found["cache"] == "miss"
        assert (await until_expired(client, gw, "/item"))["cache"] == "miss"  # u: 404 is not an error to hide
        upstream.set("/item", Behavior(status=503))
        # Past the 0.1 s window the failure is the answer.
        deadline = time.monotonic() + 5
        while (result := await source(client, gw))["cache"] == "stale":
            assert time.monotonic() < deadline
        # (its breaker may have opened meanwhile: five 503s in a row)
        assert (result["ok"], result["cache"]) == (False, "miss")
        assert result["error"]["type"] in ("upstream_status", "circuit_open")
        upstream.set("/strict", Behavior(status=503))
        strict = await until_expired_upstream(client, gw)
        assert (strict["ok"], strict["cache"]) == (False, "miss")


async def until_expired_upstream(client: aiohttp.ClientSession, gw: RunningGateway) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while (result := await source(client, gw, "/strict", upstream="w"))["cache"] == "hit":
        assert time.monotonic() < deadline
    return result
