"""Chained sources against real upstream servers and real PostgreSQL: a source starts once the sources it refers to
have answered, independent branches run side by side, one deadline covers it all, and a failed parent skips its
children (dependency_failed) without sending anything for them."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import aiohttp
import pytest
from prometheus_client import generate_latest

from tests.aggregate.conftest import post_aggregate, upstream_cfg
from tests.security.conftest import metric
from tests.support.gateway import make_settings, running_gateway
from tests.support.postgres import active_gateway_queries
from tests.support.upstream import Behavior, UpstreamServer

MARKER = f"/* gwtest chain {uuid.uuid4().hex} */"
QUERIES = {
    "orders_of": {
        "sql": "SELECT id, sku FROM orders WHERE user_id = %(user_id)s ORDER BY id LIMIT 3",
        "params": {"user_id": "int"},
    },
    "sleep": {
        "sql": f"SELECT %(user_id)s AS user_id FROM pg_sleep(30) {MARKER}",
        "params": {"user_id": "int"},
        "timeout_ms": 60_000,
    },
    "fails": {"sql": "SELECT 1 / %(zero)s AS boom", "params": {"zero": "int"}},
}
LATENCY = 0.15


def chain_sources() -> dict[str, Any]:
    """profile → org → region (three levels), orders ← profile (a query), stock alone: a graph, not a line."""
    return {
        "profile": {"upstream": "users", "path": "/users/7"},
        "org": {"upstream": "users", "path": "/orgs/${profile.data.org_id}"},
        "region": {"upstream": "inventory", "path": "/regions/${org.data.region}", "params": {"org": "${org.data.id}"}},
        "orders": {"query": "orders_of", "params": {"user_id": "${profile.data.id}"}},
        "stock": {"upstream": "inventory", "path": "/stock", "params": {"sku": "A1"}},
    }


def settings_for(users: UpstreamServer, inventory: UpstreamServer, pg_dsn: str, **limits: Any) -> Any:
    return make_settings(
        database_url=pg_dsn,
        queries=QUERIES,
        upstreams={
            "users": upstream_cfg(users.url, retry={"attempts": 1}, forward_headers=["x-tenant"]),
            "inventory": upstream_cfg(inventory.url, retry={"attempts": 1}),
        },
        limits={"max_deadline_ms": 60_000, **limits},
    )


async def test_a_chain_takes_its_critical_path_not_the_sum(
    upstream: UpstreamServer, upstream2: UpstreamServer, pg_dsn: str
) -> None:
    upstream.set("/users/7", Behavior(json={"id": 7, "org_id": "o-1"}, latency=LATENCY))
    upstream.set("/orgs/o-1", Behavior(json={"id": "o-1", "region": "eu"}, latency=LATENCY))
    upstream2.set("/regions/eu", Behavior(json={"name": "Europe"}, latency=LATENCY))
    upstream2.set("/stock", Behavior(json={"available": 3}, latency=LATENCY))
    async with running_gateway(settings_for(upstream, upstream2, pg_dsn)) as gw, aiohttp.ClientSession() as client:
        await post_aggregate(client, gw.url, {"warm": {"upstream": "users", "path": "/warm"}})
        started = time.perf_counter()
        status, body, headers = await post_aggregate(client, gw.url, chain_sources(), deadline_ms=5000)
        elapsed = time.perf_counter() - started
        exposition = generate_latest(gw.state.metrics.registry).decode()
    assert (status, headers["X-Aggregate-Complete"]) == (200, "true"), body
    results = body["results"]
    assert results["region"]["data"] == {"name": "Europe"}
    assert results["stock"]["data"] == {"available": 3}
    assert [row["id"] for row in results["orders"]["data"]], "the query ran with the id the profile answered"
    # Three levels of 150 ms: 450 ms on the critical path; the sum of the five would be 600 ms and more.
    assert 3 * LATENCY <= elapsed < 3 * LATENCY + 0.12, f"{elapsed * 1000:.0f} ms for a 450 ms critical path"
    assert results["stock"]["started_ms"] < 50
    assert results["profile"]["started_ms"] < 50
    assert LATENCY * 1000 <= results["org"]["started_ms"] < LATENCY * 1000 + 60
    assert 2 * LATENCY * 1000 <= results["region"]["started_ms"] < 2 * LATENCY * 1000 + 90
    assert results["orders"]["started_ms"] >= LATENCY * 1000
    assert [results[n]["waited_for"] for n in ("profile", "org", "region", "orders", "stock")] == [
        [],
        ["profile"],
        ["org"],
        ["profile"],
        [],
    ]
    (region_call,) = [r for r in upstream2.requests if r.path == "/regions/eu"]
    assert region_call.query == {"org": "o-1"}
    assert metric(exposition, "gateway_source_dependency_wait_seconds_count") == 3


async def test_the_access_log_shows_the_wait(
    upstream: UpstreamServer, upstream2: UpstreamServer, pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="app.access")
    upstream.set("/users/7", Behavior(json={"id": 7, "org_id": "o-1"}, latency=0.05))
    sources = {
        "profile": {"upstream": "users", "path": "/users/7"},
        "org": {"upstream": "users", "path": "/orgs/${profile.data.org_id}"},
    }
    async with running_gateway(settings_for(upstream, upstream2, pg_dsn)) as gw, aiohttp.ClientSession() as client:
        await post_aggregate(client, gw.url, sources)
    (line,) = [r for r in caplog.records if getattr(r, "route", None) == "/aggregate"]
    logged = line.sources  # type: ignore[attr-defined]
    assert "waited_ms" not in logged["profile"]
    assert logged["org"]["after"] == ["profile"]
    assert logged["org"]["waited_ms"] >= 50


FAILURES = [
    pytest.param(Behavior(status=500), {}, "upstream_status", id="upstream_status"),
    pytest.param(Behavior(latency=2.0), {"timeout_ms": 100}, "timeout", id="timeout"),
    pytest.param(Behavior(mode="reset"), {}, "connect", id="connect"),
    pytest.param(
        Behavior(body=b"{not json", headers={"Content-Type": "application/json"}), {}, "bad_response", id="bad"
    ),
    pytest.param(Behavior(json={"big": "x" * 4096}), {"max_response_bytes": 1024}, "too_large", id="too_large"),
]


@pytest.mark.parametrize(("behavior", "overrides", "kind"), FAILURES)
async def test_a_failed_parent_skips_its_children_and_theirs(
    upstream: UpstreamServer,
    upstream2: UpstreamServer,
    pg_dsn: str,
    behavior: Behavior,
    overrides: dict[str, Any],
    kind: str,
) -> None:
    upstream.set("/users/7", behavior)
    upstream2.set("/stock", Behavior(json={"available": 3}))
    settings = make_settings(
        database_url=pg_dsn,
        queries=QUERIES,
        upstreams={
            "users": upstream_cfg(upstream.url, retry={"attempts": 1}, **overrides),
            "inventory": upstream_cfg(upstream2.url, retry={"attempts": 1}),
        },
    )
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        status, body, _ = await post_aggregate(client, gw.url, chain_sources(), deadline_ms=3000)
    results = body["results"]
    assert status == 200
    assert results["profile"]["error"]["type"] == kind
    assert results["org"]["error"] == {"type": "dependency_failed", "message": f"profile failed: {kind}"}
    assert results["orders"]["error"] == {"type": "dependency_failed", "message": f"profile failed: {kind}"}
    assert results["region"]["error"] == {
        "type": "dependency_failed",
        "message": f"org was not called: profile failed: {kind}",
    }
    for name in ("org", "orders", "region"):
        assert (results[name]["attempts"], results[name]["data"], results[name]["status"]) == (0, None, None)
    assert results["stock"]["ok"] is True, "an independent branch is not held back"
    # (A reset may be tried twice: the HTTP client resends once on a connection that broke before any answer.)
    assert [r.path for r in upstream.requests + upstream2.requests if r.path not in ("/users/7", "/stock")] == []


async def test_a_failed_query_skips_its_children(upstream: UpstreamServer, pg_dsn: str) -> None:
    upstream.set("/users/7", Behavior(json={"id": 7, "zero": 0}))
    sources = {
        "profile": {"upstream": "users", "path": "/users/7"},
        "boom": {"query": "fails", "params": {"zero": "${profile.data.zero}"}},
        "after": {"upstream": "users", "path": "/after/${boom.data[0].boom}"},
    }
    async with running_gateway(settings_for(upstream, upstream, pg_dsn)) as gw, aiohttp.ClientSession() as client:
        _, body, _ = await post_aggregate(client, gw.url, sources)
    assert body["results"]["boom"]["error"]["type"] == "db_error"
    assert body["results"]["after"]["error"] == {"type": "dependency_failed", "message": "boom failed: db_error"}
    assert upstream.count() == 1


async def test_an_open_breaker_skips_the_children(upstream: UpstreamServer, pg_dsn: str) -> None:
    upstream.set("/users/7", Behavior(status=503))
    settings = make_settings(
        upstreams={"users": upstream_cfg(upstream.url, retry={"attempts": 1}, breaker={"consecutive_failures": 1})}
    )
    sources = {
        "profile": {"upstream": "users", "path": "/users/7"},
        "org": {"upstream": "users", "path": "/orgs/${profile.data.org_id}"},
    }
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        await post_aggregate(client, gw.url, sources)
        _, body, _ = await post_aggregate(client, gw.url, sources)
    assert body["results"]["profile"]["error"]["type"] == "circuit_open"
    assert body["results"]["org"]["error"]["message"] == "profile failed: circuit_open"
    assert upstream.count() == 1


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"id": 7}, "path: profile.data has no key 'org_id'"),
        ({"org_id": {"id": 1}}, "path: ${profile.data.org_id} is an object, not a scalar"),
        ({"org_id": [1]}, "path: ${profile.data.org_id} is a list, not a scalar"),
        ({"org_id": None}, "path: ${profile.data.org_id} is null, not a scalar"),
        ([1, 2], "path: profile.data is a list, not an object: no key 'org_id'"),
    ],
)
async def test_a_missing_or_non_scalar_value_skips_the_source(
    upstream: UpstreamServer, answer: Any, message: str
) -> None:
    upstream.set("/users/7", Behavior(json=answer))
    settings = make_settings(upstreams={"users": upstream_cfg(upstream.url)})
    sources = {
        "profile": {"upstream": "users", "path": "/users/7"},
        "org": {"upstream": "users", "path": "/orgs/${profile.data.org_id}"},
    }
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        status, body, headers = await post_aggregate(client, gw.url, sources)
    assert (status, headers["X-Aggregate-Complete"]) == (200, "false")
    assert body["results"]["profile"]["ok"] is True
    assert body["results"]["org"]["error"] == {"type": "dependency_failed", "message": message}
    assert upstream.count() == 1


async def test_a_deadline_in_the_middle_of_a_chain(upstream: UpstreamServer, pg_dsn: str, pg_server_url: str) -> None:
    upstream.set("/users/7", Behavior(json={"id": 7, "org_id": "o-1"}, latency=0.05))
    upstream.set("/orgs/o-1", Behavior(mode="hang"))
    sources = {
        "profile": {"upstream": "users", "path": "/users/7"},
        "org": {"upstream": "users", "path": "/orgs/${profile.data.org_id}"},
        "region": {"upstream": "users", "path": "/regions/${org.data.region}"},
        "slow": {"query": "sleep", "params": {"user_id": "${profile.data.id}"}},
        "after_slow": {"upstream": "users", "path": "/after/${slow.data[0].user_id}"},
    }
    settings = settings_for(upstream, upstream, pg_dsn)
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        started = time.perf_counter()
        _, body, _ = await post_aggregate(client, gw.url, sources, deadline_ms=400)
        elapsed = time.perf_counter() - started
        await upstream.await_disconnects(1)
        deadline = time.monotonic() + 5
        while gw.state.db.executor.stats().busy or active_gateway_queries(pg_server_url, MARKER):
            assert time.monotonic() < deadline, "the query kept running on the server"
            await asyncio.sleep(0.02)
        assert gw.state.upstreams.upstreams["users"].in_flight == 0
    results = body["results"]
    assert 0.38 < elapsed < 1.0, f"answered after {elapsed * 1000:.0f} ms for a 400 ms deadline"
    assert results["profile"]["ok"] is True
    for name in ("org", "region", "slow", "after_slow"):
        assert results[name]["error"]["type"] == "deadline", (name, results[name])
    assert (results["org"]["attempts"], results["region"]["attempts"], results["after_slow"]["attempts"]) == (1, 0, 0)
    assert results["region"]["waited_for"] == ["org"]
    assert [r.path for r in upstream.requests] == ["/users/7", "/orgs/o-1"]


async def test_queries_take_the_value_typed_as_they_declare(upstream: UpstreamServer, pg_dsn: str) -> None:
    upstream.set("/users/7", Behavior(json={"id": "7", "name": "x"}))  # an id as text: the query's int converts it
    sources = {
        "profile": {"upstream": "users", "path": "/users/7"},
        "orders": {"query": "orders_of", "params": {"user_id": "${profile.data.id}"}},
        "bad": {"query": "orders_of", "params": {"user_id": "${profile.data.name}"}},
    }
    async with running_gateway(settings_for(upstream, upstream, pg_dsn)) as gw, aiohttp.ClientSession() as client:
        _, body, _ = await post_aggregate(client, gw.url, sources)
    assert body["results"]["orders"]["ok"] is True
    assert body["results"]["bad"]["error"] == {
        "type": "dependency_failed",
        "message": "params.user_id: expected an integer (the value referred to is a string)",
    }


async def test_a_large_parent_is_decoded_where_its_children_can_read_it(upstream: UpstreamServer) -> None:
    # Bodies over 64 KiB are decoded in a worker and embedded pre-encoded, which a reference cannot read into.
    big = {"org_id": "o-1", "padding": ["x" * 100] * 1000}
    upstream.set("/users/7", Behavior(json=big))
    upstream.set("/orders", Behavior(json=[{"id": 1, "padding": ["y" * 100] * 1000}]))
    upstream.set("/orgs/o-1", Behavior(json={"name": "Acme"}))
    upstream.set("/o/1", Behavior(json={"key": "k-1", "padding": ["z" * 100] * 1000}))
    settings = make_settings(upstreams={"users": upstream_cfg(upstream.url)}, compute={"enabled": True, "workers": 1})
    sources = {
        "profile": {"upstream": "users", "path": "/users/7"},
        "org": {"upstream": "users", "path": "/orgs/${profile.data.org_id}"},
        "orders": {"upstream": "users", "path": "/orders"},
        "items": {"upstream": "users", "path": "/o/${each}", "for_each": "${orders.data[*].id}"},
        "keys": {"upstream": "users", "path": "/k/${each}", "for_each": "${items.data[*].data.key}"},
    }
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        _, body, _ = await post_aggregate(client, gw.url, sources)
    results = body["results"]
    assert results["org"]["data"] == {"name": "Acme"}, results["org"]
    assert len(results["profile"]["data"]["padding"]) == 1000
    assert results["keys"]["ok"] is True, results["keys"]
    assert [r.path for r in upstream.requests if r.path.startswith("/k/")] == ["/k/k-1"]


async def test_a_deadline_already_past_fails_every_source_of_a_chain(upstream: UpstreamServer) -> None:
    settings = make_settings(upstreams={"users": upstream_cfg(upstream.url)})
    sources = {
        "profile": {"upstream": "users", "path": "/users/7"},
        "org": {"upstream": "users", "path": "/orgs/${profile.data.org_id}"},
    }
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        status, body, _ = await post_aggregate(client, gw.url, sources, deadline_ms=0.001)
    assert status == 200
    assert {r["error"]["type"] for r in body["results"].values()} == {"deadline"}
    assert body["results"]["org"]["waited_for"] == ["profile"]
    assert body["results"]["org"]["attempts"] == 0


async def test_a_client_gone_mid_chain_cancels_everything(upstream: UpstreamServer) -> None:
    upstream.set("/users/7", Behavior(json={"id": 7, "org_id": "o-1"}))
    upstream.set("/orgs/o-1", Behavior(mode="hang"))
    settings = make_settings(upstreams={"users": upstream_cfg(upstream.url, timeout_ms=10_000)})
    sources = {
        "profile": {"upstream": "users", "path": "/users/7"},
        "org": {"upstream": "users", "path": "/orgs/${profile.data.org_id}"},
        "region": {"upstream": "users", "path": "/regions/${org.data.region}"},
        "items": {"upstream": "users", "path": "/items/${each}", "for_each": "${org.data.items[*]}"},
    }
    async with running_gateway(settings) as gw:
        async with aiohttp.ClientSession() as client:
            request = asyncio.create_task(post_aggregate(client, gw.url, sources, deadline_ms=10_000))
            await upstream.await_requests(2)
            request.cancel()
            await asyncio.gather(request, return_exceptions=True)
        await upstream.await_disconnects(1)
        deadline = time.monotonic() + 5
        while any(t.get_name().startswith("source:") for t in asyncio.all_tasks()):
            assert time.monotonic() < deadline, "a source's task outlived its request"
            await asyncio.sleep(0.02)
        assert gw.state.upstreams.upstreams["users"].in_flight == 0
    assert [r.path for r in upstream.requests] == ["/users/7", "/orgs/o-1"]
