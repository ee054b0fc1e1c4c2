"""The in-flight middleware through the real app and a real uvicorn server: Connection: close while draining,
and the drain's deadline turning a running request into a 503 problem, counted and exported."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import Behavior, UpstreamServer


async def metric(client: aiohttp.ClientSession, url: str, name: str) -> float:
    async with client.get(f"{url}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


async def test_deadline_cancels_running_requests_with_a_503_problem(upstream: UpstreamServer) -> None:
    upstream.set("/hang", Behavior(mode="hang"))
    settings = make_settings(upstreams={"slow": {"base_url": upstream.url, "timeout_ms": 30000}})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        in_flight = gw.server.drain.in_flight
        body = {"sources": {"never": {"upstream": "slow", "path": "/hang"}}, "deadline_ms": 9000}
        request = asyncio.create_task(client.post(f"{gw.url}/aggregate", json=body))
        await upstream.await_requests(1)
        assert await metric(client, gw.url, "gateway_http_requests_in_flight") == 2  # the aggregate, this scrape
        assert await metric(client, gw.url, "gateway_drain_cancelled_requests_total") == 0

        in_flight.cancel_at(asyncio.get_running_loop().time() + 0.1)
        async with await request as resp:
            assert resp.status == 503
            assert resp.headers["Content-Type"] == "application/problem+json"
            assert resp.headers["Connection"] == "close"
            problem = await resp.json(content_type=None)
        assert problem["type"] == "urn:gateway:problem:shutting-down"
        assert problem["status"] == 503
        await upstream.await_disconnects(1)  # the upstream call was cancelled with the request, not left running
        assert in_flight.cancelled == 1
        assert len(in_flight) == 0


async def test_answers_close_their_connection_once_draining() -> None:
    async with running_gateway(make_settings()) as gw, aiohttp.ClientSession() as client:
        async with client.get(f"{gw.url}/healthz") as resp:
            assert resp.headers.get("Connection", "keep-alive").lower() != "close"
        gw.server.drain.in_flight.close_connections = True
        async with client.get(f"{gw.url}/healthz") as resp:
            assert resp.status == 200
            assert resp.headers["Connection"] == "close"
