"""Composites declared in the config: typed templates, field allowlists, merge modes, required sources."""

from __future__ import annotations

from typing import Any

import aiohttp
import psycopg2

from tests.aggregate.conftest import upstream_cfg
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import Behavior, UpstreamServer


def composite_settings(users: UpstreamServer, stock: UpstreamServer, pg_dsn: str, merge: str = "grouped") -> Any:
    return make_settings(
        database_url=pg_dsn,
        upstreams={"users": upstream_cfg(users.url, retry={"attempts": 1}), "inventory": upstream_cfg(stock.url)},
        queries={
            "orders": {
                "sql": "SELECT id, sku FROM orders WHERE user_id = %(user_id)s ORDER BY id LIMIT %(limit)s",
                "params": {"user_id": "int", "limit": "int"},
            }
        },
        composites={
            "overview": {
                "params": {"user_id": "int", "sku": "str"},
                "merge": merge,
                "sources": {
                    "profile": {
                        "upstream": "users",
                        "path": "/users/{user_id}",
                        "required": True,
                        "fields": ["id", "name"],
                    },
                    "stock": {"upstream": "inventory", "path": "/stock", "params": {"sku": "{sku}"}},
                    "orders": {"query": "orders", "params": {"user_id": "{user_id}", "limit": "2"}},
                },
            }
        },
    )


async def get(client: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with client.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_grouped_composite(upstream: UpstreamServer, upstream2: UpstreamServer, pg_dsn: str) -> None:
    upstream.set("/users/7", Behavior(json={"id": 7, "name": "Ada", "email": "secret@example.com"}))
    upstream2.set("/stock", Behavior(json={"sku": "A1", "available": 3}))
    async with running_gateway(composite_settings(upstream, upstream2, pg_dsn)) as gw, aiohttp.ClientSession() as c:
        status, body = await get(c, f"{gw.url}/aggregate/overview?user_id=7&sku=A1")
    assert status == 200
    assert body["complete"] is True
    assert body["results"]["profile"]["data"] == {"id": 7, "name": "Ada"}  # email is not in the allowlist
    assert body["results"]["stock"]["data"] == {"sku": "A1", "available": 3}
    conn = psycopg2.connect(pg_dsn)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM orders WHERE user_id = 7 ORDER BY id LIMIT 2")
        expected = [row[0] for row in cur.fetchall()]
    conn.close()
    assert [row["id"] for row in body["results"]["orders"]["data"]] == expected
    assert upstream2.requests[0].query == {"sku": "A1"}


async def test_flat_composite(upstream: UpstreamServer, upstream2: UpstreamServer, pg_dsn: str) -> None:
    upstream.set("/users/7", Behavior(json={"id": 7, "name": "Ada"}))
    upstream2.set("/stock", Behavior(json={"sku": "A1", "id": "stock-id"}))
    settings = composite_settings(upstream, upstream2, pg_dsn, merge="flat")
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as c:
        status, body = await get(c, f"{gw.url}/aggregate/overview?user_id=7&sku=A1")
    assert status == 200
    data = body["data"]
    assert data["id"] == 7
    assert data["name"] == "Ada"
    assert data["sku"] == "A1"
    assert data["stock.id"] == "stock-id"  # a clash never overwrites
    assert len(data["orders"]) == 2
    assert "data" not in body["results"]["profile"]
    assert body["results"]["stock"]["ok"] is True


async def test_required_source_failure_is_502(upstream: UpstreamServer, upstream2: UpstreamServer, pg_dsn: str) -> None:
    upstream.set("/users/7", Behavior(status=503))
    upstream2.set("/stock", Behavior(json={}))
    async with running_gateway(composite_settings(upstream, upstream2, pg_dsn)) as gw, aiohttp.ClientSession() as c:
        async with c.get(f"{gw.url}/aggregate/overview?user_id=7&sku=A1") as resp:
            body = await resp.json()
            assert resp.status == 502
            assert resp.headers["X-Aggregate-Complete"] == "false"
        upstream.set("/users/7", Behavior(json={}))
        upstream2.set("/stock", Behavior(status=500))
        status, partial = await get(c, f"{gw.url}/aggregate/overview?user_id=7&sku=A1")
    assert body["results"]["profile"]["error"]["type"] == "upstream_status"
    assert body["results"]["orders"]["ok"] is True
    assert status == 200  # a failed optional source is partial, not an error
    assert partial["complete"] is False


async def test_composite_params_are_typed_and_confined(
    upstream: UpstreamServer, upstream2: UpstreamServer, pg_dsn: str
) -> None:
    async with running_gateway(composite_settings(upstream, upstream2, pg_dsn)) as gw, aiohttp.ClientSession() as c:
        status, body = await get(c, f"{gw.url}/aggregate/overview?user_id=abc&sku=A1")
        assert status == 422
        assert body["errors"][0]["loc"] == "query.user_id"
        status, body = await get(c, f"{gw.url}/aggregate/overview?sku=A1&extra=1")
        assert status == 422
        assert {e["type"] for e in body["errors"]} == {"unknown_param", "missing_param"}
        status, body = await get(c, f"{gw.url}/aggregate/nope?x=1")
        assert status == 404
        assert body["type"] == "urn:gateway:problem:not-found"
        # A value can never add a path segment: it is percent-encoded whole.
        upstream.set("/users/1%2F..%2Fadmin", Behavior(json={}))
        status, body = await get(c, f"{gw.url}/aggregate/overview?user_id=1&sku=..%2F..%2Fadmin")
        assert status == 200
    assert upstream2.requests[-1].query == {"sku": "../../admin"}
    assert all(r.path in ("/users/1", "/stock") for r in upstream.requests + upstream2.requests)
