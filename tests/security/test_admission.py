"""The global in-flight limit: the excess is answered 503 + Retry-After at once; probes are never shed."""

from __future__ import annotations

import asyncio
import time

import aiohttp
from prometheus_client import generate_latest

from tests.aggregate.conftest import upstream_cfg
from tests.security.conftest import metric
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import Behavior, UpstreamServer


async def test_excess_is_shed_at_once_and_admitted_requests_finish(upstream: UpstreamServer) -> None:
    upstream.set("/slow", Behavior(latency=0.5))
    settings = make_settings(
        upstreams={"a": upstream_cfg(upstream.url, timeout_ms=5000)},
        limits={"max_in_flight_requests": 3, "shed_retry_after_s": 2},
    )
    body = {"sources": {"s": {"upstream": "a", "path": "/slow"}}, "deadline_ms": 5000}
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:

        async def call() -> tuple[int, float, str | None]:
            started = time.perf_counter()
            async with client.post(f"{gw.url}/aggregate", json=body) as resp:
                await resp.read()
                return resp.status, time.perf_counter() - started, resp.headers.get("Retry-After")

        admitted = [asyncio.create_task(call()) for _ in range(3)]
        await upstream.await_requests(3)
        shed = await asyncio.gather(*(call() for _ in range(10)))
        async with client.get(f"{gw.url}/healthz") as resp:
            assert resp.status == 200  # exempt
        async with client.get(f"{gw.url}/readyz") as resp:
            assert resp.status == 200
        done = await asyncio.gather(*admitted)
        async with client.post(f"{gw.url}/aggregate", json=body) as resp:
            assert resp.status == 200  # capacity is back
        text = generate_latest(gw.state.metrics.registry).decode()
    assert [s for s, _, _ in done] == [200, 200, 200]
    assert all(status == 503 and retry == "2" for status, _, retry in shed)
    assert max(elapsed for _, elapsed, _ in shed) < 0.25, "the excess must not wait for capacity"
    assert upstream.count() == 4
    assert metric(text, "gateway_http_requests_shed_total", reason="in_flight") == 10
