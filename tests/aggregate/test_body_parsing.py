"""The aggregate body is parsed by pydantic in one pass (for speed); the contract stays FastAPI's: JSON only,
422 problems naming each location, and the body's schema in the OpenAPI document."""

from __future__ import annotations

import aiohttp
import pytest

from tests.aggregate.conftest import upstream_cfg
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import UpstreamServer

VALID = b'{"sources": {"s": {"upstream": "a", "path": "/x"}}}'


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json", 200),
        ("application/json; charset=utf-8", 200),
        ("application/vnd.gateway+json", 200),
        (None, 200),  # no Content-Type: read as JSON, as FastAPI does
        ("text/plain", 422),
        ("application/x-www-form-urlencoded", 422),
    ],
)
async def test_json_bodies_only(upstream: UpstreamServer, content_type: str | None, status: int) -> None:
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)})
    # skip_auto_headers: aiohttp would otherwise declare raw bytes as application/octet-stream.
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        headers = {"Content-Type": content_type} if content_type else {}
        async with client.post(
            f"{gw.url}/aggregate", data=VALID, headers=headers, skip_auto_headers=["Content-Type"]
        ) as resp:
            body = await resp.json(content_type=None)
    assert resp.status == status, body
    if status == 422:
        assert body["type"] == "urn:gateway:problem:validation"
        assert body["errors"] == [
            {"loc": "body", "msg": "Content-Type must be application/json", "type": "content_type"}
        ]
    else:
        assert body["results"]["s"]["ok"] is True


async def test_errors_name_their_location_and_json_errors_are_422(upstream: UpstreamServer) -> None:
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        post = f"{gw.url}/aggregate"
        async with client.post(post, json={"sources": {"s": {"upstream": "a"}}, "deadline_ms": 0}) as resp:
            body = await resp.json(content_type=None)
        assert resp.status == 422
        assert {(e["loc"], e["type"]) for e in body["errors"]} == {
            ("body.sources.s.upstream.path", "missing"),
            ("body.deadline_ms", "greater_than"),
        }
        headers = {"Content-Type": "application/json"}
        for raw in (b"{not json", b"", b"[1, 2]", b'{"sources": {"s": {"upstream": "a", "path": "/x"}}} trailing'):
            async with client.post(post, data=raw, headers=headers) as resp:
                body = await resp.json(content_type=None)
            assert resp.status == 422, raw
            assert body["errors"][0]["loc"] == "body"
            assert "Traceback" not in str(body)
        async with client.get(f"{gw.url}/openapi.json") as resp:
            schema = (await resp.json())["paths"]["/aggregate"]["post"]["requestBody"]["content"]["application/json"]
        assert set(schema["schema"]["properties"]) == {"sources", "deadline_ms"}
    assert upstream.count() == 0
