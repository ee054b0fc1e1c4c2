"""Bad requests are refused with a 422/4xx problem naming each problem; nothing reaches an upstream."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest
from prometheus_client import generate_latest

from tests.aggregate.conftest import post_aggregate, upstream_cfg
from tests.security.conftest import metric
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import Behavior, UpstreamServer

SSRF_PATHS = [
    "http://169.254.169.254/latest/meta-data",
    "//evil.example/x",
    "/../admin",
    "/a/../../etc/passwd",
    "/%2e%2e/admin",
    "/%2E%2E%2Fadmin",
    "/%252e%252e/admin",
    "/a%2f..%2f..%2fadmin",
    "/a\\..\\admin",
    "/x?redirect=http://evil",
    "/x#frag",
    "/a//b",
    "relative/path",
    "/x\r\nHost: evil",
    "/%00",
]


@pytest.mark.parametrize("path", SSRF_PATHS)
async def test_unsafe_paths_are_refused(upstream: UpstreamServer, path: str) -> None:
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url + "/api")})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        status, body, headers = await post_aggregate(client, gw.url, {"s": {"upstream": "a", "path": path}})
    assert status == 422, body
    assert headers["Content-Type"] == "application/problem+json"
    assert body["errors"][0]["loc"] == "sources.s.path"
    assert upstream.count() == 0


async def test_path_stays_under_the_base_path(upstream: UpstreamServer) -> None:
    upstream.set("/api/users/7", Behavior(json={"id": 7}))
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url + "/api")})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        status, body, _ = await post_aggregate(client, gw.url, {"s": {"upstream": "a", "path": "/users/7"}})
    assert status == 200
    assert body["results"]["s"]["data"] == {"id": 7}
    assert [r.path for r in upstream.requests] == ["/api/users/7"]


async def test_redirects_are_not_followed(upstream: UpstreamServer, upstream2: UpstreamServer) -> None:
    upstream.set("/go", Behavior(status=302, headers={"Location": f"{upstream2.url}/secret"}))
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        status, body, _ = await post_aggregate(client, gw.url, {"s": {"upstream": "a", "path": "/go"}})
    assert status == 200
    assert body["results"]["s"]["error"]["type"] == "upstream_status"
    assert body["results"]["s"]["status"] == 302
    assert upstream2.count() == 0


@pytest.mark.parametrize(
    ("sources", "loc"),
    [
        ({"s": {"upstream": "nope", "path": "/x"}}, "sources.s.upstream"),
        ({"s": {"query": "nope"}}, "sources.s.query"),
        ({"s": {"upstream": "a", "path": "/x", "headers": {"Authorization": "x"}}}, "sources.s.headers"),
        ({"s": {"upstream": "a", "path": "/x", "headers": {"Host": "evil"}}}, "sources.s.headers"),
    ],
)
async def test_unknown_names_and_headers_are_named(upstream: UpstreamServer, sources: dict[str, Any], loc: str) -> None:
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url, forward_headers=["x-tenant"])})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        status, body, _ = await post_aggregate(client, gw.url, sources)
    assert status == 422
    assert [e["loc"] for e in body["errors"]] == [loc]
    assert upstream.count() == 0


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"sources": {}},
        {"sources": {"s": {"path": "/x"}}},
        {"sources": {"s": {"upstream": "a"}}},
        {"sources": {"s": {"upstream": "a", "path": "/x", "method": "TRACE"}}},
        {"sources": {"s": {"upstream": "a", "path": "/x"}}, "deadline_ms": -1},
        {"sources": {"bad name!": {"upstream": "a", "path": "/x"}}},
        {"sources": {"s": {"upstream": "a", "path": "/x", "extra": 1}}},
        {"sources": [1, 2]},
        "not an object",
    ],
)
async def test_malformed_bodies_are_422(upstream: UpstreamServer, payload: Any) -> None:
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        async with client.post(f"{gw.url}/aggregate", json=payload) as resp:
            body = await resp.json(content_type=None)
            assert resp.status == 422, body
            assert resp.content_type == "application/problem+json"
        async with client.post(f"{gw.url}/aggregate", data=b"{not json") as resp:
            assert resp.status == 422
            assert (await resp.json(content_type=None))["type"] == "urn:gateway:problem:validation"
    assert body["type"] == "urn:gateway:problem:validation"
    assert body["errors"]
    assert "Traceback" not in str(body)


async def test_too_many_sources_and_too_large_bodies(upstream: UpstreamServer) -> None:
    settings = make_settings(
        upstreams={"a": upstream_cfg(upstream.url)}, limits={"max_sources": 2, "max_body_bytes": 4096}
    )
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        sources = {f"s{i}": {"upstream": "a", "path": "/x"} for i in range(3)}
        status, body, _ = await post_aggregate(client, gw.url, sources)
        assert status == 422
        assert body["errors"][0]["type"] == "too_many_sources"
        big = {"s": {"upstream": "a", "path": "/x", "json": {"blob": "x" * 10_000}}}
        status, body, _ = await post_aggregate(client, gw.url, big)
        assert status == 413
        assert body["type"] == "urn:gateway:problem:payload-too-large"

        async def chunks():  # type: ignore[no-untyped-def]
            for _ in range(10):
                yield b" " * 1000

        # No Content-Length: the limit holds while the body streams in.
        async with client.post(f"{gw.url}/aggregate", data=chunks()) as resp:
            assert resp.status == 413
        status, body, _ = await post_aggregate(client, gw.url, {"s": {"upstream": "a", "path": "/x"}})
        assert status == 200
    assert upstream.count() == 1


async def test_a_body_that_is_not_json_is_named_as_such(upstream: UpstreamServer) -> None:
    upstream.set("/x", Behavior(json={"ok": 1}))
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)})
    valid = b'{"sources": {"s": {"upstream": "a", "path": "/x"}}}'

    async def post(body: bytes, content_type: str | None) -> tuple[int, Any]:
        headers = {"Content-Type": content_type} if content_type else {}
        async with client.post(
            f"{gw.url}/aggregate", data=body, headers=headers, skip_auto_headers=["Content-Type"]
        ) as resp:
            return resp.status, await resp.json(content_type=None)

    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        for content_type in (None, "text/plain", "application/x-www-form-urlencoded"):
            status, body = await post(valid, content_type)
            assert status == 422
            assert body["errors"] == [
                {
                    "loc": "body",
                    "msg": "the body must be JSON, sent with Content-Type: application/json",
                    "type": "content_type",
                }
            ]
        status, body = await post(valid[:-3], "application/json")
        assert status == 422
        (error,) = body["errors"]
        assert (error["loc"], error["type"]) == ("body", "json_invalid")
        assert "line 1 column" in error["msg"], "says where the JSON broke"
        assert (await post(valid, "application/json; charset=utf-8"))[0] == 200
        assert (await post(valid, "application/merge-patch+json"))[0] == 200
    assert upstream.count() == 2


async def test_a_client_gone_while_sending_its_body_is_no_error(
    upstream: UpstreamServer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)})
    async with running_gateway(settings) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        head = (
            f"POST /aggregate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        writer.write(head.encode() + b'{"sources":')
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            text = generate_latest(gw.state.metrics.registry).decode()
            if metric(text, "gateway_http_requests_total", route="/aggregate", method="POST", status="499") == 1:
                break
            assert asyncio.get_running_loop().time() < deadline, "the gateway never finished the request"
            await asyncio.sleep(0.01)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a client going away is not an error"
    assert upstream.count() == 0


@pytest.mark.parametrize(
    ("headers", "loc"),
    [
        ({"X-Tenant": "a\r\nX-Injected: 1"}, "body.sources.s.upstream.headers.X-Tenant"),
        ({"X-Tenant": "trailing\n"}, "body.sources.s.upstream.headers.X-Tenant"),
        ({"X-Ten\u212aant": "a"}, "body.sources.s.upstream.headers.X-Ten\u212aant.[key]"),
        ({"X-Tenant": "a", "x-tenant": "b"}, "body.sources.s.upstream.headers"),
    ],
)
async def test_forwarded_headers_that_would_break_the_upstream_request_are_422(
    upstream: UpstreamServer, headers: dict[str, str], loc: str
) -> None:
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url, forward_headers=["x-tenant"])})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        status, body, _ = await post_aggregate(
            client, gw.url, {"s": {"upstream": "a", "path": "/x", "headers": headers}}
        )
    assert status == 422, body
    assert [e["loc"] for e in body["errors"]] == [loc]
    assert upstream.count() == 0
