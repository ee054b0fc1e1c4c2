"""API keys: 401 without a valid one, 403 outside its scopes or allowlists, probes open, checks before the body."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from app.errors import StartupError
from app.main import create_app
from tests.aggregate.conftest import upstream_cfg
from tests.security.conftest import Key, auth_with, new_key
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import UpstreamServer

AGG = new_key("agg", ["aggregate"])
TRANSFORM_ONLY = new_key("xf", ["transform"])
METRICS = new_key("scraper", ["metrics"])


def settings_for(upstream: UpstreamServer, *keys: Key, **sections: Any) -> Any:
    return make_settings(
        upstreams={"users": upstream_cfg(upstream.url), "inventory": upstream_cfg(upstream.url)},
        auth=auth_with(*keys),
        # GET /transform lists the running pool's transforms: a pool of one.
        compute={"enabled": True, "workers": 1},
        **sections,
    )


async def problem_of(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    assert resp.content_type == "application/problem+json"
    body: dict[str, Any] = await resp.json(content_type=None)
    assert body["status"] == resp.status
    return body


ONE_SOURCE = {"sources": {"u": {"upstream": "users", "path": "/users/1"}}}


async def test_no_key_wrong_key_and_the_two_ways_to_send_one(upstream: UpstreamServer) -> None:
    async with running_gateway(settings_for(upstream, AGG)) as gw, aiohttp.ClientSession() as client:
        async with client.post(f"{gw.url}/aggregate", json=ONE_SOURCE) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert (await problem_of(resp))["type"] == "urn:gateway:problem:unauthorized"
        wrong = {"Authorization": "Bearer " + AGG.secret[:-1] + ("x" if AGG.secret[-1] != "x" else "y")}
        for headers in (wrong, {"Authorization": f"Basic {AGG.secret}"}, {"X-API-Key": ""}):
            async with client.post(f"{gw.url}/aggregate", json=ONE_SOURCE, headers=headers) as resp:
                assert resp.status == 401, headers
        # Two different keys in one request: neither counts.
        both = {**AGG.bearer, "X-API-Key": new_key("other", ["aggregate"]).secret}
        async with client.post(f"{gw.url}/aggregate", json=ONE_SOURCE, headers=both) as resp:
            assert resp.status == 401
        for headers in (
            AGG.bearer,
            AGG.header,
            {"Authorization": f"bearer   {AGG.secret}"},
            {**AGG.bearer, **AGG.header},
        ):
            async with client.post(f"{gw.url}/aggregate", json=ONE_SOURCE, headers=headers) as resp:
                assert resp.status == 200, (headers, await resp.text())
    assert upstream.count() == 4, "only authenticated requests reach an upstream"


async def test_scopes_are_enforced_and_probes_stay_open(upstream: UpstreamServer) -> None:
    async with (
        running_gateway(settings_for(upstream, AGG, TRANSFORM_ONLY, METRICS)) as gw,
        aiohttp.ClientSession() as client,
    ):
        async with client.post(f"{gw.url}/aggregate", json=ONE_SOURCE, headers=TRANSFORM_ONLY.bearer) as resp:
            assert resp.status == 403
            body = await problem_of(resp)
            assert body["type"] == "urn:gateway:problem:forbidden"
            assert "'aggregate' scope" in body["detail"]
        async with client.get(f"{gw.url}/transform", headers=AGG.bearer) as resp:
            assert resp.status == 403
        async with client.get(f"{gw.url}/transform", headers=TRANSFORM_ONLY.bearer) as resp:
            assert resp.status == 200
        for path in ("/healthz", "/readyz", "/openapi.json"):
            async with client.get(f"{gw.url}{path}") as resp:
                assert resp.status == 200, path
        async with client.get(f"{gw.url}/metrics") as resp:
            assert resp.status == 401
        async with client.get(f"{gw.url}/metrics", headers=AGG.bearer) as resp:
            assert resp.status == 403
        async with client.get(f"{gw.url}/metrics", headers=METRICS.header) as resp:
            assert resp.status == 200
            text = await resp.text()
        # Unknown paths: a valid key finds nothing (404); no key learns nothing (401).
        async with client.get(f"{gw.url}/admin") as resp:
            assert resp.status == 401
        async with client.get(f"{gw.url}/admin", headers=AGG.bearer) as resp:
            assert resp.status == 404
    assert 'gateway_auth_failures_total{reason="scope"}' in text
    assert upstream.count() == 0


async def test_admin_listener_serves_metrics_without_a_key(upstream: UpstreamServer) -> None:
    settings = settings_for(upstream, METRICS, observability={"admin_port": 0})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        # The admin port is protected by the network (bind it to a private address), not by keys.
        async with client.get(f"http://127.0.0.1:{gw.state.admin_port}/metrics") as resp:
            assert resp.status == 200
            assert "gateway_ready 1.0" in await resp.text()
        async with client.get(f"{gw.url}/metrics", headers=METRICS.bearer) as resp:
            assert resp.status == 404  # not served publicly at all


async def test_allowlists_refuse_sources_by_name_before_anything_is_sent(upstream: UpstreamServer, pg_dsn: str) -> None:
    limited = new_key("limited", ["aggregate"], upstreams=["users"], queries=[], composites=["overview"])
    composite = {"sources": {"u": {"upstream": "inventory", "path": "/stock"}}}
    settings = settings_for(
        upstream,
        limited,
        AGG,
        database_url=pg_dsn,
        queries={"tiers": {"sql": "SELECT tier FROM users LIMIT 1"}},
        composites={"overview": composite, "other": composite},
    )
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        sources = {
            "ok": {"upstream": "users", "path": "/users/1"},
            "inv": {"upstream": "inventory", "path": "/stock"},
            "q": {"query": "tiers"},
            "ghost": {"upstream": "no_such_upstream", "path": "/x"},
        }
        async with client.post(f"{gw.url}/aggregate", json={"sources": sources}, headers=limited.bearer) as resp:
            assert resp.status == 403
            body = await problem_of(resp)
        # Every refused source is named; a name that does not exist is refused the same way, revealing nothing.
        assert sorted(e["loc"] for e in body["errors"]) == [
            "sources.ghost.upstream",
            "sources.inv.upstream",
            "sources.q.query",
        ]
        assert {e["type"] for e in body["errors"]} == {"not_allowed"}
        assert upstream.count() == 0

        async with client.post(f"{gw.url}/aggregate", json=ONE_SOURCE, headers=limited.bearer) as resp:
            assert resp.status == 200
        # A composite is one grant: its own sources need no upstream grant.
        async with client.get(f"{gw.url}/aggregate/overview", headers=limited.bearer) as resp:
            assert resp.status == 200, await resp.text()
        for name in ("other", "no_such_composite"):
            async with client.get(f"{gw.url}/aggregate/{name}", headers=limited.bearer) as resp:
                assert resp.status == 403
                assert name in (await problem_of(resp))["detail"]
        # A key without allowlists may use everything.
        async with client.post(f"{gw.url}/aggregate", json={"sources": sources}, headers=AGG.bearer) as resp:
            assert resp.status == 422  # only the ghost upstream is wrong: it does not exist
        async with client.get(f"{gw.url}/aggregate/other", headers=AGG.bearer) as resp:
            assert resp.status == 200


async def test_refused_before_the_body_is_read(upstream: UpstreamServer) -> None:
    settings = settings_for(upstream, AGG, limits={"max_body_bytes": 4096})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        # Too large, and too deep: without a key, neither is looked at.
        async with client.post(f"{gw.url}/aggregate", data=b"x" * 100_000) as resp:
            assert resp.status == 401
        async with client.post(f"{gw.url}/aggregate", data=b"[" * 2000 + b"]" * 2000) as resp:
            assert resp.status == 401
        async with client.post(f"{gw.url}/aggregate", data=b"x" * 100_000, headers=AGG.bearer) as resp:
            assert resp.status == 413


async def test_authentication_on_without_keys_refuses_to_start() -> None:
    settings = make_settings(auth={"enabled": True})
    app = create_app(settings)
    with pytest.raises(StartupError, match="no keys are configured"):
        async with app.router.lifespan_context(app):
            pytest.fail("the gateway must not start open")


async def test_switched_off_explicitly_everything_is_open(
    upstream: UpstreamServer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(upstreams={"users": upstream_cfg(upstream.url)}, auth={"enabled": False})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        async with client.post(f"{gw.url}/aggregate", json=ONE_SOURCE) as resp:
            assert resp.status == 200
        async with client.get(f"{gw.url}/metrics") as resp:
            assert resp.status == 200
    assert any("authentication is OFF" in r.getMessage() for r in caplog.records)
