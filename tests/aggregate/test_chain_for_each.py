"""for_each: one call per element of a list another source answered, concurrently, bounded by max_items and by the
request's limits.max_sources; a list too long is the source's error, never cut short silently."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.aggregate.conftest import post_aggregate, upstream_cfg
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import Behavior, UpstreamServer

ORDERS = [{"id": 11, "sku": "A"}, {"id": 12, "sku": "B"}, {"id": 13, "sku": "C"}]


def sources(**shipments: Any) -> dict[str, Any]:
    return {
        "orders": {"upstream": "a", "path": "/orders"},
        "shipments": {
            "upstream": "a",
            "path": "/shipments/${each}",
            "for_each": "${orders.data[*].id}",
            **shipments,
        },
    }


async def test_one_call_per_element_concurrently(upstream: UpstreamServer) -> None:
    upstream.set("/orders", Behavior(json=ORDERS))
    for order in ORDERS:
        upstream.set(f"/shipments/{order['id']}", Behavior(json={"order": order["id"]}, latency=0.1))
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        status, body, headers = await post_aggregate(client, gw.url, sources(max_items=3))
    assert (status, headers["X-Aggregate-Complete"]) == (200, "true"), body
    result = body["results"]["shipments"]
    assert result["ok"] is True
    assert result["waited_for"] == ["orders"]
    assert result["attempts"] == 3
    assert [item["data"] for item in result["data"]] == [{"order": 11}, {"order": 12}, {"order": 13}]
    assert all(item["ok"] and item["status"] == 200 for item in result["data"])
    assert upstream.peak_concurrency == 3
    assert result["elapsed_ms"] < 250, "the elements ran one after another"


async def test_elements_may_be_objects_read_by_key(upstream: UpstreamServer) -> None:
    upstream.set("/orders", Behavior(json=ORDERS))
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)})
    shipments = {"path": "/skus/${each.sku}", "params": {"order": "${each.id}"}, "for_each": "${orders.data[*]}"}
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        _, body, _ = await post_aggregate(client, gw.url, sources(**shipments))
    assert body["results"]["shipments"]["ok"] is True
    calls = sorted((r.path, r.query["order"]) for r in upstream.requests if r.path != "/orders")
    assert calls == [("/skus/A", "11"), ("/skus/B", "12"), ("/skus/C", "13")]


async def test_an_empty_list_makes_no_call(upstream: UpstreamServer) -> None:
    upstream.set("/orders", Behavior(json=[]))
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        _, body, _ = await post_aggregate(client, gw.url, sources())
    assert body["results"]["shipments"] == {**body["results"]["shipments"], "ok": True, "data": [], "attempts": 0}
    assert upstream.count() == 1


async def test_a_list_over_max_items_is_refused_not_truncated(upstream: UpstreamServer) -> None:
    upstream.set("/orders", Behavior(json=ORDERS))
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        status, body, headers = await post_aggregate(client, gw.url, sources(max_items=2))
    assert (status, headers["X-Aggregate-Complete"]) == (200, "false")
    assert body["results"]["shipments"]["error"] == {
        "type": "too_many_items",
        "message": "for_each: 3 elements, over max_items (2)",
    }
    assert body["results"]["shipments"]["attempts"] == 0
    assert upstream.count() == 1, "no element was called"


async def test_the_calls_count_against_max_sources(upstream: UpstreamServer) -> None:
    upstream.set("/orders", Behavior(json=ORDERS))
    within = make_settings(upstreams={"a": upstream_cfg(upstream.url)}, limits={"max_sources": 4})
    over = make_settings(upstreams={"a": upstream_cfg(upstream.url)}, limits={"max_sources": 3})
    async with running_gateway(within) as gw, aiohttp.ClientSession() as client:
        _, fits, _ = await post_aggregate(client, gw.url, sources())  # 1 + 3 calls
    upstream.reset_stats()
    async with running_gateway(over) as gw, aiohttp.ClientSession() as client:
        _, body, _ = await post_aggregate(client, gw.url, sources())  # 1 + 3 calls, 3 allowed
    assert fits["complete"] is True
    assert body["results"]["shipments"]["error"] == {
        "type": "too_many_items",
        "message": "for_each: 3 more calls would take the request past limits.max_sources (3 calls)",
    }
    assert upstream.count() == 1


async def test_each_element_has_its_own_outcome(upstream: UpstreamServer) -> None:
    upstream.set("/orders", Behavior(json=[{"id": 1}, {"nope": 2}, {"id": 3}]))
    upstream.set("/shipments/3", Behavior(status=404))
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        _, body, _ = await post_aggregate(client, gw.url, sources())
    result = body["results"]["shipments"]
    first, second, third = result["data"]
    assert first["ok"] is True
    assert second["error"] == {"type": "dependency_failed", "message": "for_each: the element has no key 'id'"}
    assert (third["error"]["type"], third["status"]) == ("upstream_status", 404)
    assert result["ok"] is False
    assert result["error"] == {
        "type": "dependency_failed",
        "message": "2 of 3 calls failed; element 1: for_each: the element has no key 'id'",
    }
    assert sorted(r.path for r in upstream.requests) == ["/orders", "/shipments/1", "/shipments/3"]


async def test_for_each_over_something_not_a_list(upstream: UpstreamServer) -> None:
    upstream.set("/orders", Behavior(json={"id": 1}))
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        _, body, _ = await post_aggregate(client, gw.url, sources())
    assert body["results"]["shipments"]["error"] == {
        "type": "dependency_failed",
        "message": "for_each: ${orders.data[*].id} names an object, not a list",
    }


async def test_a_child_of_a_fan_out_reads_its_elements(upstream: UpstreamServer) -> None:
    upstream.set("/orders", Behavior(json=ORDERS[:2]))
    upstream.set("/shipments/11", Behavior(json={"carrier": "dhl"}))
    upstream.set("/shipments/12", Behavior(json={"carrier": "ups"}))
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)})
    chain = {
        **sources(),
        "carrier": {"upstream": "a", "path": "/carriers/${shipments.data[-1].data.carrier}"},
    }
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        _, body, _ = await post_aggregate(client, gw.url, chain)
    assert body["complete"] is True, body
    assert body["results"]["carrier"]["data"] == {"path": "/carriers/ups", "ok": True}
