"""Balancing through the running gateway (real lifespan, real uvicorn, /aggregate) across real servers on
127.0.0.2, 127.0.0.3, ...: the spread under steady load, a slow endpoint under P2C against round robin in the same
run, and what /debug/pools and /metrics show.

The statistical bounds are far from what is measured (see each test), so that a loaded machine cannot flake them:
the spread's ±15 % is more than 4 standard deviations of a fair random pick over the calls sent."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from app.settings import Settings
from tests.aggregate.conftest import post_aggregate
from tests.support.fleet import fleet
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import Behavior, UpstreamServer

SOURCES = 8  # calls per aggregate


def gateway_settings(servers: list[UpstreamServer], **upstream: Any) -> Settings:
    cfg = {
        "endpoints": [s.url for s in servers],
        "max_concurrency": 64,
        "timeout_ms": 2000,
        "retry": {"attempts": 1},
        **upstream,
    }
    return make_settings(
        upstreams={"u": cfg}, http={"max_in_flight": 128, "max_connections": 256}, observability={"admin_port": 0}
    )


async def load(url: str, *, workers: int, aggregates: int, calls: int = SOURCES) -> None:
    """``workers`` clients, each sending ``aggregates`` aggregates of ``calls`` calls one after another."""
    sources = {f"s{i}": {"upstream": "u", "path": "/w"} for i in range(calls)}

    async def client_loop(client: aiohttp.ClientSession) -> None:
        for _ in range(aggregates):
            status, body, _ = await post_aggregate(client, url, sources, deadline_ms=5000)
            assert status == 200, body
            assert body["complete"], body

    async with aiohttp.ClientSession() as client, asyncio.TaskGroup() as group:
        for _ in range(workers):
            group.create_task(client_loop(client))


@pytest.mark.parametrize("policy", ["p2c", "round_robin"])
async def test_steady_load_is_spread_evenly(policy: str) -> None:
    with fleet(3) as servers:
        async with running_gateway(gateway_settings(servers, policy=policy)) as gw:
            await load(gw.url, workers=4, aggregates=60)
        counts = [s.count("/w") for s in servers]
    total = 4 * 60 * SOURCES
    assert sum(counts) == total
    fair = total / 3
    assert all(abs(n - fair) <= 0.15 * fair for n in counts), counts


async def test_a_slow_endpoint_gets_clearly_fewer_calls_under_p2c() -> None:
    shares: dict[str, float] = {}
    with fleet(3) as servers:
        servers[0].set("/w", Behavior(latency=0.2))
        for policy in ("round_robin", "p2c"):
            for server in servers:
                server.reset_stats()
            async with running_gateway(gateway_settings(servers, policy=policy)) as gw:
                await load(gw.url, workers=16, aggregates=30, calls=2)
            counts = [s.count("/w") for s in servers]
            shares[policy] = counts[0] / sum(counts)
    # Round robin gives the slow endpoint its third whatever it costs; P2C on least outstanding requests sees its
    # calls pile up and sends elsewhere. Measured 0.06-0.12 for P2C on a loaded 2-core machine (the fast
    # endpoints' counts include the time their answers wait for the gateway's loop, so never near 0); the bound
    # is 60 % of a fair share.
    assert abs(shares["round_robin"] - 1 / 3) < 0.02, shares
    assert shares["p2c"] < 0.2, shares


async def test_debug_and_metrics_show_the_endpoints() -> None:
    with fleet(2) as servers:
        servers[1].set("/w", Behavior(status=503))
        settings = gateway_settings(servers, outlier={"consecutive_failures": 2})
        per_endpoint = make_settings(
            upstreams=settings.model_dump()["upstreams"],
            observability={"admin_port": 0, "endpoint_metrics": True},
        )
        for cfg, shown in ((settings, False), (per_endpoint, True)):
            async with running_gateway(cfg) as gw, aiohttp.ClientSession() as client:
                admin = f"http://127.0.0.1:{gw.state.admin_port}"
                sources = {f"s{i}": {"upstream": "u", "path": "/w"} for i in range(SOURCES)}
                for _ in range(3):
                    await post_aggregate(client, gw.url, sources)
                async with client.get(f"{admin}/debug/pools") as resp:
                    pools = (await resp.json())["upstreams"]["u"]
                async with client.get(f"{admin}/metrics") as resp:
                    metrics = await resp.text()
            assert pools["policy"] == "p2c"
            by_key = {e["endpoint"]: e for e in pools["endpoints"]}
            bad = by_key[f"{servers[1].host}:{servers[1].port}"]
            assert bad["state"] == "ejected"
            assert bad["ejections"] == 1
            assert bad["ejected_for_s"] > 0
            assert by_key[f"{servers[0].host}:{servers[0].port}"]["state"] == "active"
            assert 'gateway_upstream_endpoints{state="ejected",upstream="u"} 1.0' in metrics
            assert 'gateway_upstream_ejections_total{upstream="u"} 1.0' in metrics
            assert ("gateway_upstream_endpoint_calls_total{" in metrics) is shown
            if shown:
                key = f"{servers[1].host}:{servers[1].port}"
                assert f'gateway_upstream_endpoint_ejections_total{{endpoint="{key}",upstream="u"}} 1.0' in metrics


async def test_the_running_gateway_resolves_a_name_to_its_addresses(upstream: UpstreamServer) -> None:
    """The system resolver, through the real lifespan: `localhost` becomes its addresses (127.0.0.1 among them),
    each an endpoint, called under the name."""
    settings = make_settings(
        upstreams={
            "u": {"base_url": f"http://localhost:{upstream.port}", "dns_refresh_s": 60, "retry": {"attempts": 3}}
        },
        observability={"admin_port": 0},
    )
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        status, body, _ = await post_aggregate(client, gw.url, {"s": {"upstream": "u", "path": "/w"}})
        async with client.get(f"http://127.0.0.1:{gw.state.admin_port}/debug/pools") as resp:
            endpoints = (await resp.json())["upstreams"]["u"]["endpoints"]
    assert status == 200, body
    assert body["results"]["s"]["ok"], body
    assert f"127.0.0.1:{upstream.port}" in {e["endpoint"] for e in endpoints}
    assert upstream.requests[-1].headers["host"] == f"localhost:{upstream.port}"
