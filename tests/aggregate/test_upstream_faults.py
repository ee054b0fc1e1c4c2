"""Upstreams that misbehave: each fault maps to its own error type, and nothing else is disturbed."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest

from tests.aggregate.conftest import post_aggregate, upstream_cfg
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import Behavior, UpstreamServer


@pytest.mark.parametrize(
    ("behavior", "kind"),
    [
        (Behavior(mode="reset"), "connect"),
        (Behavior(mode="garbage"), "bad_response"),
        (Behavior(body=b"{not json", headers={"Content-Type": "application/json"}), "bad_response"),
        (Behavior(body=b"x" * 5000), "too_large"),
        (Behavior(mode="hang"), "timeout"),
        (Behavior(mode="slow_body", body=b'{"a": 1}', latency=0.1), "timeout"),
    ],
)
async def test_each_fault_has_its_type(upstream: UpstreamServer, behavior: Behavior, kind: str) -> None:
    upstream.set("/bad", behavior)
    upstream.set("/good", Behavior(json={"fine": True}))
    cfg = upstream_cfg(upstream.url, timeout_ms=300, max_response_bytes=4096, retry={"attempts": 1})
    async with running_gateway(make_settings(upstreams={"a": cfg})) as gw, aiohttp.ClientSession() as client:
        status, body, _ = await post_aggregate(
            client, gw.url, {"bad": {"upstream": "a", "path": "/bad"}, "good": {"upstream": "a", "path": "/good"}}
        )
    assert status == 200
    assert body["results"]["bad"]["error"]["type"] == kind, body
    assert body["results"]["good"]["data"] == {"fine": True}


async def test_unreachable_upstream_is_a_connect_error() -> None:
    with UpstreamServer() as gone:
        url = gone.url
    cfg = upstream_cfg(url, retry={"attempts": 2, "backoff_initial_ms": 1})
    async with running_gateway(make_settings(upstreams={"a": cfg})) as gw, aiohttp.ClientSession() as client:
        started = time.perf_counter()
        _, body, _ = await post_aggregate(client, gw.url, {"s": {"upstream": "a", "path": "/x"}})
    assert body["results"]["s"]["error"]["type"] == "connect"
    assert body["results"]["s"]["attempts"] == 2
    assert time.perf_counter() - started < 0.5


async def test_large_upstream_json_does_not_stall_the_loop(upstream: UpstreamServer) -> None:
    big = orjson.dumps({"items": [{"id": i, "name": f"item-{i}", "tags": ["a", "b", "c"]} for i in range(120_000)]})
    assert len(big) > 5_000_000
    # What decoding one such body on the loop would stall it for, on this machine, now (about 200 ms here).
    started = time.perf_counter()
    orjson.loads(big)
    inline_s = time.perf_counter() - started
    upstream.set("/big", Behavior(body=big, headers={"Content-Type": "application/json"}))
    cfg = upstream_cfg(upstream.url, max_response_bytes=16 * 1024 * 1024, timeout_ms=10_000)
    settings = make_settings(upstreams={"a": cfg}, compute={"enabled": True, "workers": 2})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        await post_aggregate(client, gw.url, {"warm": {"upstream": "a", "path": "/warm"}})
        lags: list[float] = []
        stop = asyncio.Event()

        async def probe() -> None:
            while not stop.is_set():
                expected = time.perf_counter() + 0.002
                await asyncio.sleep(0.002)
                lags.append(time.perf_counter() - expected)

        prober = asyncio.create_task(probe())
        sources = {f"b{i}": {"upstream": "a", "path": "/big"} for i in range(3)}
        async with client.post(f"{gw.url}/aggregate", json={"sources": sources, "deadline_ms": 10_000}) as resp:
            raw = await resp.read()
        stop.set()
        await prober
    body = orjson.loads(raw)  # decoded here, after the probe: the client's own decode is not the gateway's lag
    assert all(len(r["data"]["items"]) == 120_000 for r in body["results"].values())
    # The test's own loop is the gateway's loop here (and its client's: the 19 MB answer is read on it too), so
    # the bound is relative: decoded inline, each body would stall the loop for a whole decode.
    assert max(lags) < inline_s / 2, (
        f"worst loop lag {max(lags) * 1000:.1f} ms while decoding; inline, one decode took {inline_s * 1000:.0f} ms"
    )


async def test_large_bodies_are_validated_and_filtered_in_a_worker(upstream: UpstreamServer) -> None:
    rows = [{"id": i, "name": f"n{i}", "secret": "s" * 20} for i in range(5000)]
    good = orjson.dumps(rows)
    assert len(good) > 64 * 1024
    upstream.set("/rows", Behavior(body=good, headers={"Content-Type": "application/json"}))
    upstream.set("/broken", Behavior(body=good[:-5], headers={"Content-Type": "application/json"}))
    cfg = upstream_cfg(upstream.url, retry={"attempts": 1})
    settings = make_settings(
        upstreams={"a": cfg},
        compute={"enabled": True, "workers": 1},
        composites={
            "c": {
                "sources": {
                    "rows": {"upstream": "a", "path": "/rows", "fields": ["id"]},
                    "broken": {"upstream": "a", "path": "/broken"},
                }
            }
        },
    )
    async with (
        running_gateway(settings) as gw,
        aiohttp.ClientSession() as client,
        client.get(f"{gw.url}/aggregate/c") as resp,
    ):
        body = await resp.json()
    assert body["results"]["rows"]["data"] == [{"id": i} for i in range(5000)]
    assert body["results"]["broken"]["error"]["type"] == "bad_response"
    assert "invalid JSON" in body["results"]["broken"]["error"]["message"]
