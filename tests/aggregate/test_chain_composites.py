"""References in declared composites, next to their {param} placeholders: checked when the config is loaded,
run as a graph per request; `required` keeps its meaning along a chain."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from pydantic import ValidationError

from tests.aggregate.conftest import upstream_cfg
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import Behavior, UpstreamServer

QUERIES = {
    "orders": {
        "sql": "SELECT id, sku FROM orders WHERE user_id = %(user_id)s ORDER BY id LIMIT %(limit)s",
        "params": {"user_id": "int", "limit": "int"},
    }
}


def composite(**overrides: Any) -> dict[str, Any]:
    sources: dict[str, Any] = {
        "profile": {"upstream": "users", "path": "/users/{user_id}", "fields": ["id", "org"]},
        "org": {"upstream": "users", "path": "/orgs/${profile.data.org}/{region}", "required": True},
        "orders": {"query": "orders", "params": {"user_id": "${profile.data.id}", "limit": "{limit}"}},
        "stock": {
            "upstream": "inventory",
            "path": "/stock/${each}",
            "params": {"user": "u-{user_id}-${profile.data.id}"},
            "for_each": "${orders.data[*].sku}",
            "max_items": 5,
        },
    }
    sources.update(overrides)
    return {"params": {"user_id": "int", "region": "str", "limit": "int"}, "sources": sources}


def settings_for(users: UpstreamServer, inventory: UpstreamServer, pg_dsn: str, **overrides: Any) -> Any:
    return make_settings(
        database_url=pg_dsn,
        queries=QUERIES,
        upstreams={"users": upstream_cfg(users.url), "inventory": upstream_cfg(inventory.url)},
        composites={"chain": composite(**overrides)},
    )


async def get(client: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with client.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_a_chained_composite(upstream: UpstreamServer, upstream2: UpstreamServer, pg_dsn: str) -> None:
    upstream.set("/users/7", Behavior(json={"id": 7, "org": "acme", "secret": "x"}))
    upstream.set("/orgs/acme/eu", Behavior(json={"name": "Acme"}))
    async with running_gateway(settings_for(upstream, upstream2, pg_dsn)) as gw, aiohttp.ClientSession() as client:
        status, body = await get(client, f"{gw.url}/aggregate/chain?user_id=7&region=eu&limit=2")
    assert (status, body["complete"]) == (200, True), body
    results = body["results"]
    assert results["org"]["data"] == {"name": "Acme"}
    skus = [row["sku"] for row in results["orders"]["data"]]
    assert len(skus) == 2
    assert [item["data"]["path"] for item in results["stock"]["data"]] == [f"/stock/{sku}" for sku in skus]
    assert {r.query["user"] for r in upstream2.requests} == {"u-7-7"}
    assert results["stock"]["waited_for"] == ["profile", "orders"]  # in the order they are written


async def test_required_keeps_its_meaning_along_a_chain(
    upstream: UpstreamServer, upstream2: UpstreamServer, pg_dsn: str
) -> None:
    # The profile is optional and fails; the org it feeds is required and so is not called: the answer is a 502.
    upstream.set("/users/7", Behavior(status=500))
    async with running_gateway(settings_for(upstream, upstream2, pg_dsn)) as gw, aiohttp.ClientSession() as client:
        status, body = await get(client, f"{gw.url}/aggregate/chain?user_id=7&region=eu&limit=2")
    assert status == 502
    assert body["results"]["org"]["error"] == {
        "type": "dependency_failed",
        "message": "profile failed: upstream_status",
    }
    assert upstream.count() == 1
    assert upstream2.count() == 0


async def test_a_value_from_the_query_string_and_one_from_a_parent_side_by_side(
    upstream: UpstreamServer, upstream2: UpstreamServer, pg_dsn: str
) -> None:
    upstream.set("/users/7", Behavior(json={"id": 7, "org": "../admin"}))
    async with running_gateway(settings_for(upstream, upstream2, pg_dsn)) as gw, aiohttp.ClientSession() as client:
        status, _ = await get(client, f"{gw.url}/aggregate/chain?user_id=7&region=eu&limit=1")
        refused, problem = await get(client, f"{gw.url}/aggregate/chain?user_id=7&region=..&limit=1")
    assert status == 200
    assert [r.raw_path for r in upstream.requests if r.path != "/users/7"] == ["/orgs/..%2Fadmin/eu"]
    assert (refused, problem["errors"][0]["loc"]) == (422, "query.region")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"org": {"upstream": "users", "path": "/orgs/${profil.data.org}/{region}"}},
            "composite 'chain' sources.org.path: '${profil.data.org}' names no source of this aggregate ('profil')",
        ),
        (
            {"profile": {"upstream": "users", "path": "/users/{user_id}/${org.data.x}"}},
            "composite 'chain' sources.profile.path: references make a cycle: profile → org → profile",
        ),
        (
            {
                "head": {"upstream": "users", "path": "/h", "method": "HEAD"},
                "x": {"query": "orders", "params": {"user_id": "${head.data.id}", "limit": "1"}},
            },
            "composite 'chain' sources.x.params.user_id: '${head.data.id}': head is a HEAD",
        ),
        (
            {"stock": {"upstream": "inventory", "path": "/s/${each}", "for_each": "${orders.data}"}},
            "composite 'chain' sources.stock.for_each: for_each is one reference to a list",
        ),
    ],
)
def test_a_composite_s_bad_graph_stops_the_start(pg_dsn: str, overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError) as caught:
        make_settings(
            database_url=pg_dsn,
            queries=QUERIES,
            upstreams={"users": upstream_cfg("http://127.0.0.1:1"), "inventory": upstream_cfg("http://127.0.0.1:1")},
            composites={"chain": composite(**overrides)},
        )
    assert expected in str(caught.value)


def test_the_chain_depth_of_composites_follows_the_limit(pg_dsn: str) -> None:
    with pytest.raises(ValueError, match=r"over limits\.max_chain_depth"):
        make_settings(
            database_url=pg_dsn,
            queries=QUERIES,
            upstreams={"users": upstream_cfg("http://127.0.0.1:1"), "inventory": upstream_cfg("http://127.0.0.1:1")},
            composites={"chain": composite()},
            limits={"max_chain_depth": 2},
        )
