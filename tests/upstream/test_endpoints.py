"""An upstream with several endpoints, against real servers on 127.0.0.2, 127.0.0.3, ...: retries that move to
another endpoint, outlier ejection and return (on an injected clock), max_ejection_percent, active health
checks, DNS refresh with a zone the test controls, draining, and TLS that checks the service's name whatever
address is dialled."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme

from app.errors import UpstreamConnectError
from app.settings import Settings
from app.upstream.client import UpstreamClient
from app.upstream.resolver import SystemResolver
from tests.support.fleet import Clock, Zone, fleet, get, open_client, until
from tests.support.gateway import make_settings
from tests.support.upstream import Behavior, UpstreamServer

NO_BREAKER = {"consecutive_failures": 10_000, "min_calls": 10_000}


def settings_for(**upstream: Any) -> Settings:
    cfg: dict[str, Any] = {
        "max_concurrency": 64,
        "timeout_ms": 2000,
        "retry": {"attempts": 1},
        "breaker": NO_BREAKER,
        **upstream,
    }
    return make_settings(upstreams={"u": cfg})


def counts(servers: list[UpstreamServer], path: str = "/w") -> list[int]:
    return [s.count(path) for s in servers]


def states(client: UpstreamClient) -> dict[str, str]:
    pool = client.upstreams["u"].endpoints
    assert pool is not None
    pool.balancer.return_due()
    return {key: ep.state for key, ep in pool.balancer.endpoints.items()}


async def test_a_single_base_url_is_not_balanced(upstream: UpstreamServer) -> None:
    async with open_client(settings_for(base_url=upstream.url)) as client:
        assert client.upstreams["u"].endpoints is None  # the plain path, decided at start-up
        assert (await get(client, "u", "/w")).status == 200


async def test_a_retry_lands_on_another_endpoint() -> None:
    with fleet(3) as servers:
        servers[0].set("/w", Behavior(status=503))
        settings = settings_for(
            endpoints=[s.url for s in servers],
            retry={"attempts": 2, "backoff_initial_ms": 1, "backoff_max_ms": 1, "budget_min_retries": 1000},
            outlier={"consecutive_failures": 10_000},
        )
        async with open_client(settings) as client:
            results = [await get(client, "u", "/w") for _ in range(60)]
        assert all(r.status == 200 for r in results)
        retried = sum(1 for r in results if r.attempts == 2)
        # Each call that met the failing endpoint went to another one for its retry, never back to it.
        assert servers[0].count("/w") == retried > 0
        assert sum(counts(servers)) == 60 + retried


async def test_a_failing_endpoint_is_ejected_and_comes_back_on_its_own() -> None:
    clock = Clock()
    with fleet(3) as servers:
        bad = servers[2]
        bad.set("/w", Behavior(status=503))
        settings = settings_for(
            endpoints=[s.url for s in servers], outlier={"consecutive_failures": 3, "base_ejection_ms": 10_000}
        )
        async with open_client(settings, clock=clock) as client:
            failures = 0
            while bad.count("/w") < 3:
                failures += await _fails(client)
            assert failures == 3
            assert states(client)[f"{bad.host}:{bad.port}"] == "ejected"
            before = bad.count("/w")
            for _ in range(40):
                assert (await get(client, "u", "/w")).status == 200
            assert bad.count("/w") == before  # out of rotation

            bad.set("/w", Behavior(status=200))
            clock.now += 9.9
            assert states(client)[f"{bad.host}:{bad.port}"] == "ejected"
            clock.now += 0.2  # the base ejection time has passed: back at the next pick
            for _ in range(40):
                assert (await get(client, "u", "/w")).status == 200
            assert bad.count("/w") > before
            assert set(states(client).values()) == {"active"}
            pool = client.upstreams["u"].endpoints
            assert pool is not None
            assert pool.balancer.ejections == 1


async def _fails(client: UpstreamClient) -> int:
    try:
        await get(client, "u", "/w")
    except Exception:
        return 1
    return 0


async def test_max_ejection_percent_holds_when_every_endpoint_fails() -> None:
    with fleet(4) as servers:
        for server in servers:
            server.set("/w", Behavior(status=503))
        settings = settings_for(
            endpoints=[s.url for s in servers], outlier={"consecutive_failures": 2, "max_ejection_percent": 50}
        )
        async with open_client(settings) as client:
            for _ in range(80):
                await _fails(client)
            assert sorted(states(client).values()) == ["active", "active", "ejected", "ejected"]
            # The two left keep taking calls: the upstream as a whole failing is the breaker's business.
            before = counts(servers)
            for _ in range(20):
                await _fails(client)
            grew = [after - was for after, was in zip(counts(servers), before, strict=True)]
            assert sum(1 for g in grew if g > 0) == 2
            assert sum(grew) == 20


async def test_an_endpoint_that_fails_its_health_checks_is_ejected_without_traffic() -> None:
    with fleet(3) as servers:
        servers[1].set("/health", Behavior(status=500))
        settings = settings_for(
            endpoints=[s.url for s in servers],
            outlier={"consecutive_failures": 2},
            health_check={"path": "/health", "interval_s": 0.05, "timeout_ms": 500},
        )
        async with open_client(settings) as client:
            key = f"{servers[1].host}:{servers[1].port}"
            await until(lambda: states(client)[key] == "ejected", what="ejected by its health checks")
            assert [s.count("/w") for s in servers] == [0, 0, 0]
            assert servers[0].count("/health") >= 2


async def test_endpoints_standing_in_for_a_named_service_are_sent_its_name() -> None:
    with fleet(2) as servers:
        port = servers[0].port
        settings = settings_for(base_url=f"http://users.internal:{port}/api", endpoints=[s.url for s in servers])
        async with open_client(settings) as client:
            for _ in range(20):
                assert (await get(client, "u", "/w")).status == 200
        for server in servers:
            assert server.count("/api/w") > 0
            assert {r.headers["host"] for r in server.requests} == {f"users.internal:{port}"}


async def test_dns_refresh_adds_and_removes_endpoints() -> None:
    with fleet(3) as servers:
        a, b, c = servers
        zone = Zone({"users.test": [a.host]})
        settings = settings_for(base_url=f"http://users.test:{a.port}/api", dns_refresh_s=0.05)
        async with open_client(settings, resolver=zone) as client:
            assert set(states(client)) == {f"{a.host}:{a.port}"}
            for _ in range(10):
                await get(client, "u", "/w")
            assert counts(servers, "/api/w") == [10, 0, 0]
            # The service's name, not the address dialled, is what the endpoint is asked for.
            assert {r.headers["host"] for r in a.requests} == {f"users.test:{a.port}"}

            zone.names["users.test"] = [a.host, b.host, c.host]
            await until(lambda: len(states(client)) == 3, what="two endpoints added")
            # Sequential calls pick among three idle endpoints at random: 150 give each new one 50 on average, and 10
            # or fewer about once in 10^9 runs (60 calls did once in a hundred).
            for _ in range(150):
                await get(client, "u", "/w")
            assert all(n > 10 for n in counts(servers, "/api/w")[1:])

            zone.names["users.test"] = [c.host]
            await until(lambda: set(states(client)) == {f"{c.host}:{c.port}"}, what="two endpoints removed")
            before = counts(servers, "/api/w")
            for _ in range(20):
                await get(client, "u", "/w")
            after = counts(servers, "/api/w")
            assert after[:2] == before[:2]
            assert after[2] == before[2] + 20

            # A failed lookup keeps the last answer: the upstream is not emptied by a DNS outage.
            del zone.names["users.test"]
            seen = zone.lookups
            await until(lambda: zone.lookups >= seen + 2, what="two more lookups")
            assert set(states(client)) == {f"{c.host}:{c.port}"}
            assert (await get(client, "u", "/w")).status == 200


async def test_no_call_is_lost_while_an_endpoint_drains() -> None:
    with fleet(2) as servers:
        a, b = servers
        for server in servers:
            server.set("/w", Behavior(latency=0.05))
        zone = Zone({"users.test": [a.host, b.host]})
        settings = settings_for(base_url=f"http://users.test:{a.port}", dns_refresh_s=0.05)
        async with open_client(settings, resolver=zone) as client:
            pool = client.upstreams["u"].endpoints
            assert pool is not None
            stop = asyncio.Event()
            outcomes: list[int] = []

            async def load() -> None:
                while not stop.is_set():
                    outcomes.append((await get(client, "u", "/w")).status)

            async with asyncio.TaskGroup() as group:
                for _ in range(8):
                    group.create_task(load())
                await until(lambda: a.in_flight >= 2, what="calls in flight on the endpoint to drain")
                drained = pool.balancer.endpoints[f"{a.host}:{a.port}"]
                connections = drained.session
                assert connections is not None
                zone.names["users.test"] = [b.host]
                await until(lambda: drained.draining, what="the endpoint leaving the set")
                assert drained.in_flight > 0  # calls were in flight on it when it left: they must finish
                # Its calls done, its connector closes, and every connection with it.
                await until(lambda: drained.in_flight == 0 and connections.closed, what="the drain")
                settled = a.count("/w")
                done = len(outcomes)
                await until(lambda: len(outcomes) >= done + 40, what="40 more calls")
                stop.set()
            assert outcomes
            assert set(outcomes) == {200}
            assert a.count("/w") == settled  # nothing new reached it once drained
            assert all(r.ended is not None and not r.disconnected for r in a.requests)
            assert pool.draining == []


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_tls_checks_the_service_name_whatever_address_is_dialled(ca: trustme.CA, tmp_path: Path) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("users.test").configure_cert(context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with fleet(2, ssl_context=context) as servers:
        zone = Zone({"users.test": [s.host for s in servers], "impostor.test": [servers[0].host]})
        port = servers[0].port
        settings = make_settings(
            upstreams={
                "u": {"base_url": f"https://users.test:{port}", "dns_refresh_s": 60, "tls": {"ca_file": str(ca_file)}},
                "wrong": {"base_url": f"https://impostor.test:{port}", "dns_refresh_s": 60,
                          "tls": {"ca_file": str(ca_file)}, "retry": {"attempts": 1}},
            }
        )  # fmt: skip
        async with open_client(settings, resolver=zone) as client:
            for _ in range(20):
                assert (await get(client, "u", "/w")).status == 200
            assert all(s.count("/w") > 0 for s in servers)
            # The same address, asked for under a name its certificate does not carry: refused.
            with pytest.raises(UpstreamConnectError, match="TLS handshake failed"):
                await get(client, "wrong", "/w")


async def test_the_system_resolver_finds_every_address_off_the_loop() -> None:
    resolver = SystemResolver()
    await resolver.start()
    try:
        assert "127.0.0.1" in await resolver.resolve("localhost", 80)
        assert await resolver.resolve("10.1.2.3", 80) == ["10.1.2.3"]
        with pytest.raises(socket.gaierror):
            await resolver.resolve("no-such-host.invalid", 80)
    finally:
        await resolver.aclose()
