"""/docs and /redoc served by the gateway itself: assets from the locked package, a narrow page policy, the schema's
access rule, and a setting that turns them off. (In a real browser: test_docs_browser.py.)"""

from __future__ import annotations

import base64
import gzip
import hashlib
import re

import aiohttp
import pytest

from app.main import create_app
from app.security.access import OPEN, OPEN_PATHS, SCHEMA_PATH, AccessRules
from app.security.keys import hash_key
from tests.support.gateway import make_settings, running_gateway

ASSET = re.compile(r'(?:href|src)="([^"]+)"')


async def test_the_pages_and_their_assets_come_from_the_gateway() -> None:
    async with running_gateway(make_settings()) as gw, aiohttp.ClientSession(auto_decompress=False) as client:
        async with client.get(f"{gw.url}/docs") as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
            page = await resp.text()
            policy = resp.headers["Content-Security-Policy"]
        urls = ASSET.findall(page)
        assert urls, page
        assert all(url.startswith("/docs/assets/") for url in urls), urls
        # The one inline script runs by its hash; nothing else inline, nothing from elsewhere.
        (script,) = re.findall(r"<script>(.*?)</script>", page, re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"script-src 'self' 'sha256-{digest}';" in policy
        assert "connect-src 'self';" in policy
        assert "validatorUrl" in script  # no schema sent to an online validator
        assert "frame-ancestors 'none'" in policy

        async with client.get(f"{gw.url}/redoc") as resp:
            assert resp.status == 200
            redoc_urls = ASSET.findall(await resp.text())
        assert any(url.endswith("/redoc.standalone.js") for url in redoc_urls)

        for url in {*urls, *redoc_urls}:
            async with client.get(gw.url + url, headers={"Accept-Encoding": "identity"}) as resp:
                assert resp.status == 200, url
                plain = await resp.read()
                assert "immutable" in resp.headers["Cache-Control"]
                kind = resp.content_type
            async with client.get(gw.url + url, headers={"Accept-Encoding": "gzip"}) as resp:
                assert resp.headers["Content-Encoding"] == "gzip"
                assert gzip.decompress(await resp.read()) == plain
            assert kind == {"js": "text/javascript", "css": "text/css", "png": "image/png"}[url.rsplit(".", 1)[1]]
            assert b"cdn.redoc.ly" not in plain

        version = urls[0].split("/")[3]
        for missing in (f"/docs/assets/{version}/swagger-ui.js.map", "/docs/assets/0.0.0/swagger-ui.css"):
            async with client.get(gw.url + missing) as resp:
                assert resp.status == 404, missing
        async with client.get(f"{gw.url}/openapi.json") as resp:
            schema = await resp.json()
    assert not any(path.startswith(("/docs", "/redoc")) for path in schema["paths"]), "not part of the API"


async def test_a_setting_turns_them_off() -> None:
    settings = make_settings(server={"docs": False})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        for path in ("/docs", "/redoc", "/docs/assets/1/swagger-ui.css"):
            async with client.get(gw.url + path) as resp:
                assert resp.status == 404, path


async def test_with_authentication_on_they_follow_the_schemas_rule() -> None:
    key = {"name": "k", "hash": hash_key("k" * 40), "scopes": ["aggregate"]}
    settings = make_settings(auth={"enabled": True, "keys": [key]})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        for path in ("/openapi.json", "/docs", "/redoc"):
            async with client.get(gw.url + path) as resp:
                assert resp.status == 200, path
        async with client.get(f"{gw.url}/aggregate/x") as resp:
            assert resp.status == 401


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/docs/assets/1.7.7/swagger-ui.css"])
def test_the_rule_is_the_schemas_whatever_it_is(path: str) -> None:
    assert AccessRules().scope_for(path) == AccessRules().scope_for(SCHEMA_PATH) == OPEN
    # Were the schema to need a key, so would its pages.
    closed = AccessRules(open_paths=[p for p in OPEN_PATHS if p != SCHEMA_PATH])
    assert closed.scope_for(path) is None
    assert closed.scope_for("/docsx") is None
    assert AccessRules().scope_for("/docsx") is None  # a prefix of a path segment, not of a string


def test_every_docs_route_has_a_rule() -> None:
    create_app(make_settings())  # raises ConfigError for a route without an access rule
