"""An exact contract: values taken as JSON typed them, null only where the document allows it, duplicate keys
refused with their location."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.aggregate.conftest import upstream_cfg
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import Behavior, UpstreamServer

QUERIES = {
    "orders_of": {
        "sql": "SELECT id FROM orders WHERE user_id = %(user_id)s AND %(flag)s AND %(label)s <> '' LIMIT %(n)s",
        "params": {"user_id": "int", "flag": "bool", "label": "str", "n": "float"},
    }
}
GOOD = {"user_id": 3, "flag": True, "label": "x", "n": 2}


async def post_raw(client: aiohttp.ClientSession, url: str, raw: bytes) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    async with client.post(f"{url}/aggregate", data=raw, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


@pytest.mark.parametrize(
    ("payload", "loc"),
    [
        ({"sources": {"s": {"upstream": "a", "path": "/x"}}, "deadline_ms": "5"}, "body.deadline_ms"),
        ({"sources": {"s": {"upstream": "a", "path": "/x", "method": None}}}, "body.sources.s.upstream.method"),
        ({"sources": {"s": {"upstream": "a", "path": "/x", "params": None}}}, "body.sources.s.upstream.params"),
        (
            {"sources": {"s": {"upstream": "a", "path": "/x", "params": {"k": None}}}},
            "body.sources.s.upstream.params.k",
        ),
        ({"sources": {"s": {"upstream": "a", "path": 5}}}, "body.sources.s.upstream.path"),
        ({"sources": {"q": {"query": "orders_of", "params": {**GOOD, "user_id": "3"}}}}, "sources.q.params"),
        ({"sources": {"q": {"query": "orders_of", "params": {**GOOD, "flag": 1}}}}, "sources.q.params"),
        ({"sources": {"q": {"query": "orders_of", "params": {**GOOD, "label": 7}}}}, "sources.q.params"),
        ({"sources": {"q": {"query": "orders_of", "params": {**GOOD, "n": "2"}}}}, "sources.q.params"),
        ({"sources": {"q": {"query": "orders_of", "params": {**GOOD, "user_id": None}}}}, "sources.q.params"),
    ],
)
async def test_no_string_is_taken_for_a_number_and_no_null_where_none_is_allowed(
    upstream: UpstreamServer, pg_dsn: str, payload: dict[str, Any], loc: str
) -> None:
    settings = make_settings(database_url=pg_dsn, queries=QUERIES, upstreams={"a": upstream_cfg(upstream.url)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        async with client.post(f"{gw.url}/aggregate", json=payload) as resp:
            body = await resp.json(content_type=None)
        async with client.post(
            f"{gw.url}/aggregate", json={"sources": {"q": {"query": "orders_of", "params": GOOD}}}
        ) as resp:
            good = await resp.json(content_type=None)
    assert body["status"] == 422, body
    assert any(e["loc"].startswith(loc) for e in body["errors"]), body
    assert good["results"]["q"]["ok"], good
    assert upstream.count() == 0


async def test_an_integer_is_a_number_and_null_is_the_default_deadline(upstream: UpstreamServer) -> None:
    upstream.set("/x", Behavior(json={}))
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        for deadline in (500, 500.5, None):
            raw = b'{"sources": {"s": {"upstream": "a", "path": "/x"}}, "deadline_ms": %s}' % (
                b"null" if deadline is None else str(deadline).encode()
            )
            status, body = await post_raw(client, gw.url, raw)
            assert (status, body["complete"]) == (200, True), body


@pytest.mark.parametrize(
    ("raw", "loc"),
    [
        (
            b'{"sources": {"s": {"upstream": "a", "path": "/x"}}, "sources": {"t": {"upstream": "a", "path": "/x"}}}',
            "body.sources",
        ),
        (
            b'{"sources": {"s": {"upstream": "a", "path": "/x"}, "s": {"upstream": "a", "path": "/y"}}}',
            "body.sources.s",
        ),
        (b'{"sources": {"s": {"upstream": "b", "upstream": "a", "path": "/x"}}}', "body.sources.s.upstream"),
        (b'{"sources": {"s": {"upstream": "a", "path": "/x", "params": {"k": 1, "k": 2}}}}', "body.sources.s.params.k"),
        (b'{"sources": {"s": {"upstream": "a", "path": "/x", "json": [{"a": 1, "a": 2}]}}}', "body.sources.s.json.0.a"),
        (
            b'{"sources": {"s": {"upstream": "a", "path": "/x"}}, "deadline_ms": 5, "deadline_ms": 500}',
            "body.deadline_ms",
        ),
    ],
)
async def test_duplicate_keys_are_refused_where_they_are(upstream: UpstreamServer, raw: bytes, loc: str) -> None:
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url), "b": upstream_cfg(upstream.url)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        status, body = await post_raw(client, gw.url, raw)
    assert status == 422, body
    assert body["type"] == "urn:gateway:problem:validation"
    assert [(e["loc"], e["type"]) for e in body["errors"]] == [(loc, "duplicate_key")]
    assert upstream.count() == 0


async def test_colons_inside_strings_are_no_duplicate(upstream: UpstreamServer) -> None:
    upstream.set("/a:b", Behavior(json={}))
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)})
    raw = b'{"sources": {"s": {"upstream": "a", "path": "/a:b", "json": {"url": "http://x", "k": {"k": "k:k"}}}}}'
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        status, body = await post_raw(client, gw.url, raw)
    assert (status, body["complete"]) == (200, True), body
