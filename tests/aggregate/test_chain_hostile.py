"""Values from an upstream's answer are data, never structure: an upstream that answers hostile values can neither
leave the path segment it fills, nor change the host, the scheme, a header or the SQL; what cannot be used safely
fails the source, and nothing is sent for it."""

from __future__ import annotations

from typing import Any

import aiohttp
import psycopg2
import pytest

from tests.aggregate.conftest import post_aggregate, upstream_cfg
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import Behavior, UpstreamServer

HOSTILE = {
    "traversal": "../admin",
    "encoded": "%2F..%2Fadmin",
    "double": "%252e%252e",
    "dots": "..",
    "dot": ".",
    "empty": "",
    "url": "http://evil.example/x",
    "crlf": "x\r\nX-Injected: 1",
    "nul": "a\x00b",
    "huge": "x" * 100_000,
    "object": {"id": 1},
    "list": [1, 2],
    "sql": "1'; DROP TABLE users; --",
    "query": "a?b=c#d",
}
QUERIES = {"echo": {"sql": "SELECT %(text)s::text AS echoed", "params": {"text": "str"}}}


def settings_for(hostile: UpstreamServer, target: UpstreamServer, pg_dsn: str) -> Any:
    return make_settings(
        database_url=pg_dsn,
        queries=QUERIES,
        upstreams={
            "hostile": upstream_cfg(hostile.url),
            "target": upstream_cfg(target.url + "/api", forward_headers=["x-tenant"]),
        },
    )


def child(**spec: Any) -> dict[str, Any]:
    return {"evil": {"upstream": "hostile", "path": "/answer"}, "child": {"upstream": "target", **spec}}


SENT = [
    pytest.param("traversal", "/api/items/..%2Fadmin", id="traversal"),
    pytest.param("encoded", "/api/items/%252F..%252Fadmin", id="encoded-slash"),
    pytest.param("double", "/api/items/%25252e%25252e", id="double-encoded"),
    pytest.param("url", "/api/items/http%3A%2F%2Fevil.example%2Fx", id="url"),
    pytest.param("query", "/api/items/a%3Fb%3Dc%23d", id="query-and-fragment"),
    pytest.param("nul", "/api/items/a%00b", id="nul"),
]


@pytest.mark.parametrize(("key", "raw_path"), SENT)
async def test_a_value_stays_inside_its_path_segment(
    upstream: UpstreamServer, upstream2: UpstreamServer, pg_dsn: str, key: str, raw_path: str
) -> None:
    upstream.set("/answer", Behavior(json=HOSTILE))
    async with (
        running_gateway(settings_for(upstream, upstream2, pg_dsn)) as gw,
        aiohttp.ClientSession() as client,
    ):
        _, body, _ = await post_aggregate(client, gw.url, child(path=f"/items/${{evil.data.{key}}}"))
    assert body["results"]["child"]["ok"] is True, body["results"]["child"]
    (sent,) = upstream2.requests
    assert sent.raw_path == raw_path
    assert sent.query == {}
    assert upstream.count() == 1, "nothing went anywhere but the configured upstreams"


REFUSED = [
    pytest.param({"path": "/items/${evil.data.dots}"}, "path: the values referred to make", id="dot-dot-segment"),
    pytest.param({"path": "/items/${evil.data.dot}"}, "path: the values referred to make", id="dot-segment"),
    pytest.param({"path": "/items/${evil.data.empty}"}, "path: the values referred to make", id="empty-segment"),
    pytest.param({"path": "/items/${evil.data.empty}/x"}, "path: the values referred to make", id="empty-middle"),
    pytest.param(
        {"path": "/i", "headers": {"x-tenant": "${evil.data.crlf}"}},
        "headers.x-tenant: the value referred to holds a control character",
        id="crlf-header",
    ),
    pytest.param(
        {"path": "/i", "headers": {"x-tenant": "t-${evil.data.nul}"}},
        "headers.x-tenant: the value referred to holds a control character",
        id="nul-header",
    ),
    pytest.param(
        {"path": "/i", "params": {"q": "${evil.data.huge}"}},
        "params.q: ${evil.data.huge} is 100000 bytes, over limits.max_reference_bytes (4096)",
        id="huge-param",
    ),
    pytest.param(
        {"path": "/i/${evil.data.huge}"},
        "path: ${evil.data.huge} is 100000 bytes, over limits.max_reference_bytes (4096)",
        id="huge-path",
    ),
    pytest.param(
        {"path": "/i", "method": "POST", "json": {"v": "${evil.data.object}"}},
        "json.v: ${evil.data.object} is an object, not a scalar",
        id="object-in-json",
    ),
    pytest.param(
        {"path": "/i", "params": {"q": "${evil.data.list}"}},
        "params.q: ${evil.data.list} is a list, not a scalar",
        id="list-in-param",
    ),
]


@pytest.mark.parametrize(("spec", "message"), REFUSED)
async def test_a_value_that_cannot_be_used_safely_fails_the_source(
    upstream: UpstreamServer, upstream2: UpstreamServer, pg_dsn: str, spec: dict[str, Any], message: str
) -> None:
    upstream.set("/answer", Behavior(json=HOSTILE))
    async with (
        running_gateway(settings_for(upstream, upstream2, pg_dsn)) as gw,
        aiohttp.ClientSession() as client,
    ):
        status, body, _ = await post_aggregate(client, gw.url, child(**spec))
    assert status == 200
    result = body["results"]["child"]
    assert result["error"]["type"] == "dependency_failed", result
    assert result["error"]["message"].startswith(message)
    assert result["attempts"] == 0
    assert upstream2.count() == 0, "nothing was sent for it"


async def test_values_are_data_in_a_json_body_and_query_string(
    upstream: UpstreamServer, upstream2: UpstreamServer, pg_dsn: str
) -> None:
    upstream.set("/answer", Behavior(json=HOSTILE))
    spec = {
        "path": "/i",
        "method": "POST",
        "params": {"q": "${evil.data.query}"},
        "json": {"text": "${evil.data.crlf}", "sql": "${evil.data.sql}"},
    }
    async with (
        running_gateway(settings_for(upstream, upstream2, pg_dsn)) as gw,
        aiohttp.ClientSession() as client,
    ):
        _, body, _ = await post_aggregate(client, gw.url, child(**spec))
    assert body["results"]["child"]["ok"] is True
    (sent,) = upstream2.requests
    assert sent.query == {"q": "a?b=c#d"}
    assert sent.body == b'{"text":"x\\r\\nX-Injected: 1","sql":"1\'; DROP TABLE users; --"}'
    assert "x-injected" not in sent.headers


async def test_sql_is_never_made_from_a_value(upstream: UpstreamServer, pg_dsn: str) -> None:
    upstream.set("/answer", Behavior(json=HOSTILE))
    sources = {
        "evil": {"upstream": "hostile", "path": "/answer"},
        "echo": {"query": "echo", "params": {"text": "${evil.data.sql}"}},
    }
    async with running_gateway(settings_for(upstream, upstream, pg_dsn)) as gw, aiohttp.ClientSession() as client:
        _, body, _ = await post_aggregate(client, gw.url, sources)
    assert body["results"]["echo"]["data"] == [{"echoed": HOSTILE["sql"]}]
    conn = psycopg2.connect(pg_dsn)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM users")
        (users,) = cur.fetchone() or (0,)
    conn.close()
    assert users > 0, "the table is still there"
