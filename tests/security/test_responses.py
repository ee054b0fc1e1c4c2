"""What every answer carries: security headers, problems without internals, CORS only when configured, and an
OpenAPI document that says all of it."""

from __future__ import annotations

import socket
from typing import Any

import aiohttp
import pytest

from app.errors import ConfigError
from app.settings import load_settings
from tests.aggregate.conftest import post_aggregate, upstream_cfg
from tests.security.conftest import auth_with, new_key
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import UpstreamServer

EXPECTED = {
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
}


async def test_security_headers_on_every_kind_of_answer(upstream: UpstreamServer) -> None:
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)}, limits={"max_headers": 10})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        answers = [
            await client.get(f"{gw.url}/healthz"),
            await client.post(f"{gw.url}/aggregate", json={"sources": {"s": {"upstream": "a", "path": "/x"}}}),
            await client.post(f"{gw.url}/aggregate", json={}),
            await client.get(f"{gw.url}/nowhere"),
            await client.get(f"{gw.url}/healthz", headers={f"x-{i}": "1" for i in range(12)}),
        ]
        for resp in answers:
            for name, value in EXPECTED.items():
                assert resp.headers.get(name) == value, (resp.url, resp.status, name)
            assert "Server" not in resp.headers
            assert resp.headers["X-Request-ID"]
            resp.release()
        assert [r.status for r in answers] == [200, 200, 422, 404, 431]


async def test_no_internal_host_names_in_any_answer(pg_dsn: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    settings = make_settings(
        upstreams={"gone": upstream_cfg(f"http://127.0.0.1:{dead}", retry={"attempts": 1})},
        database_url=f"postgresql://postgres@127.0.0.1:{dead}/x",
        database={"startup_check": False, "min_connections": 0},
        queries={"q": {"sql": "SELECT 1 AS one"}},
    )
    async with (
        running_gateway(settings) as gw,
        aiohttp.ClientSession() as client,
        client.post(
            f"{gw.url}/aggregate",
            json={"sources": {"u": {"upstream": "gone", "path": "/x"}, "d": {"query": "q"}}},
        ) as resp,
    ):
        text = await resp.text()
        body = await resp.json()
    assert body["results"]["u"]["error"]["type"] == "connect"
    assert body["results"]["d"]["error"]["type"] == "db_unavailable"
    assert "connection refused" in body["results"]["u"]["error"]["message"]
    for leak in (str(dead), "127.0.0.1", "Traceback", "postgres@"):
        assert leak not in text, f"{leak!r} leaked in {text}"


async def test_database_errors_carry_the_server_message_only(pg_dsn: str) -> None:
    settings = make_settings(
        database_url=pg_dsn, queries={"bad": {"sql": "SELECT 1 / %(d)s AS x", "params": {"d": "int"}}}
    )
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        _, body, _ = await post_aggregate(client, gw.url, {"q": {"query": "bad", "params": {"d": 0}}})
    error = body["results"]["q"]["error"]
    assert error["type"] == "db_error"
    assert error["message"] == "query failed: division by zero (SQLSTATE 22012)"


async def test_cors_is_off_unless_origins_are_configured() -> None:
    async with running_gateway(make_settings()) as gw, aiohttp.ClientSession() as client:
        preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
        async with client.options(f"{gw.url}/aggregate", headers=preflight) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers
        async with client.get(f"{gw.url}/healthz", headers={"Origin": "https://app.example"}) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers

    key = new_key("web", ["aggregate"])
    settings = make_settings(cors={"allow_origins": ["https://app.example"]}, auth=auth_with(key))
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        preflight = {
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        async with client.options(f"{gw.url}/aggregate", headers=preflight) as resp:
            assert resp.status == 200  # answered before authentication: a preflight carries no key
            assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
        async with client.options(
            f"{gw.url}/aggregate", headers={**preflight, "Origin": "https://evil.example"}
        ) as resp:
            assert resp.headers.get("Access-Control-Allow-Origin") is None
        # A refusal is readable by the page that caused it.
        async with client.post(f"{gw.url}/aggregate", json={}, headers={"Origin": "https://app.example"}) as resp:
            assert resp.status == 401
            assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"


@pytest.mark.parametrize("origins", [["*"], ["https://app.example/path"], ["app.example"]])
def test_cors_needs_explicit_origins(tmp_path: Any, origins: list[str]) -> None:
    config = tmp_path / "g.toml"
    config.write_text(f"[cors]\nallow_origins = {origins!r}\n".replace("'", '"'))
    with pytest.raises(ConfigError, match=r"cors\.allow_origins"):
        load_settings(config, environ=False)


async def test_openapi_declares_problems_and_security() -> None:
    key = new_key("k", ["aggregate"])
    async with running_gateway(make_settings(auth=auth_with(key))) as gw, aiohttp.ClientSession() as client:
        async with client.get(f"{gw.url}/openapi.json") as resp:
            doc = await resp.json()
        async with client.get(f"{gw.url}/docs") as resp:
            # Served like the schema (open), and loading nothing from elsewhere (tests/routes/test_docs.py).
            assert resp.status == 200
            assert "connect-src 'self'" in resp.headers["Content-Security-Policy"]
    problem = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    post = doc["paths"]["/aggregate"]["post"]
    for status in ("400", "401", "403", "413", "414", "422", "429", "431", "500", "503"):
        assert post["responses"][status]["content"] == problem, status
    assert post["responses"]["429"]["headers"]["Retry-After"]["required"] is True
    assert post["security"] == [{"bearerAuth": []}, {"apiKeyAuth": []}]
    assert "security" not in doc["paths"]["/healthz"]["get"]
    assert "401" not in doc["paths"]["/healthz"]["get"]["responses"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert doc["components"]["securitySchemes"]["apiKeyAuth"]["name"] == "X-API-Key"
    ready_503 = doc["paths"]["/readyz"]["get"]["responses"]["503"]["content"]
    assert list(ready_503) == ["application/json"]  # the readiness report, not a problem
