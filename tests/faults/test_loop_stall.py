"""A timeout the gateway caused is not held against the upstream: a real `gateway serve` is paused (SIGSTOP, as a
CPU-throttled or descheduled pod is) while a call is in flight, and resumed after the call's timeout has passed.

When the loop turns again, the expired timer wins whatever the upstream did meanwhile. The source fails with
`timeout` and says the loop stood still, but the breaker, which opens here on one failure, stays closed, and the
attempt is counted as outcome `stalled`. The control is the same timeout with the gateway running throughout: it
opens its upstream's breaker.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import aiohttp
import pytest

from tests.faults.support import aggregate, config, serve
from tests.security.conftest import metric
from tests.support.gateway import GatewayProcess
from tests.support.upstream import Behavior, UpstreamServer

TIMEOUT_MS = 1500
# Longer than the timeout, so that it runs out while the gateway is stopped.
PAUSE_S = 2.5
ONE_FAILURE_OPENS = {"consecutive_failures": 1, "open_ms": 60_000}
UPSTREAM = {"timeout_ms": TIMEOUT_MS, "retry": {"attempts": 1}, "breaker": ONE_FAILURE_OPENS}


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer("hanging") as server:
        server.set("/hang", Behavior(json={}, latency=30))
        yield server


@pytest.fixture(scope="module")
def gateway(upstream: UpstreamServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    data = config(
        upstreams={name: {"base_url": upstream.url, **UPSTREAM} for name in ("paused", "running")},
        observability={"loop_lag_interval_ms": 20},
    )
    with serve(tmp_path_factory.mktemp("stall"), data) as gw:
        yield gw


async def breaker_state(client: aiohttp.ClientSession, gw: GatewayProcess, name: str) -> float:
    async with client.get(f"{gw.url}/metrics") as resp:
        return metric(await resp.text(), "gateway_upstream_breaker_state", upstream=name)


async def attempts(client: aiohttp.ClientSession, gw: GatewayProcess, name: str, outcome: str) -> float:
    async with client.get(f"{gw.url}/metrics") as resp:
        text = await resp.text()
    return metric(text, "gateway_upstream_request_duration_seconds_count", upstream=name, outcome=outcome)


@pytest.mark.blocks_loop  # stopped, the gateway reports its loop blocked for the pause
async def test_a_timeout_run_out_while_the_gateway_stood_still_leaves_the_breaker_closed(
    gateway: GatewayProcess, upstream: UpstreamServer
) -> None:
    source = {"s": {"upstream": "paused", "path": "/hang"}}
    async with aiohttp.ClientSession() as client:
        before = upstream.count("/hang")
        call = asyncio.create_task(aggregate(client, gateway, source, deadline_ms=10_000))
        await upstream.await_requests(before + 1)
        gateway.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(PAUSE_S)  # the stall under test, not a wait for something to happen
        finally:
            gateway.signal(signal.SIGCONT)
        _, body, _ = await call
        error = body["results"]["s"]["error"]
        assert error["type"] == "timeout", body
        assert "event loop stood still" in error["message"], error
        assert await breaker_state(client, gateway, "paused") == 0, "closed: the stall was the gateway's"
        assert await attempts(client, gateway, "paused", "stalled") == 1
        assert await attempts(client, gateway, "paused", "timeout") == 0

        # The next call is sent (not refused by an open breaker); the upstream still hangs, and with the gateway
        # running this timeout is the upstream's: it opens the breaker.
        _, body, _ = await aggregate(client, gateway, source, deadline_ms=10_000)
        assert body["results"]["s"]["error"]["type"] == "timeout", body
        assert "stood still" not in body["results"]["s"]["error"]["message"]
        assert await breaker_state(client, gateway, "paused") == 2


async def test_the_same_timeout_with_the_gateway_running_opens_the_breaker(gateway: GatewayProcess) -> None:
    async with aiohttp.ClientSession() as client:
        source = {"s": {"upstream": "running", "path": "/hang"}}
        _, body, _ = await aggregate(client, gateway, source, deadline_ms=10_000)
        error = body["results"]["s"]["error"]
        assert error["type"] == "timeout", body
        assert "stood still" not in error["message"]
        assert await breaker_state(client, gateway, "running") == 2
        assert await attempts(client, gateway, "running", "timeout") == 1
        assert await attempts(client, gateway, "running", "stalled") == 0
