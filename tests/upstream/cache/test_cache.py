"""The cache against real upstreams, through a real gateway: what is stored, for whom, for how long, and how much.

Every upstream here is a real HTTP server on loopback that counts what reaches it and, where it matters, answers
differently per request header, so that an answer served to the wrong client would show."""

from __future__ import annotations

import time

import aiohttp

from tests.aggregate.conftest import upstream_cfg
from tests.security.conftest import auth_with, new_key
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import Behavior, UpstreamServer
from tests.upstream.cache.conftest import cache_metric, cached_cfg, source

FRESH = {"Cache-Control": "max-age=60"}


async def test_a_second_identical_call_is_a_hit(upstream: UpstreamServer) -> None:
    upstream.set("/item", Behavior(json={"n": 1}, headers=FRESH))
    settings = make_settings(upstreams={"u": cached_cfg(upstream.url), "plain": upstream_cfg(upstream.url)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        first = await source(client, gw)
        second = await source(client, gw)
        plain = await source(client, gw, upstream="plain")
        assert (first["cache"], first["attempts"], first["data"]) == ("miss", 1, {"n": 1})
        assert (second["cache"], second["attempts"], second["data"]) == ("hit", 0, {"n": 1})
        assert plain["cache"] is None  # an upstream without a cache says so
        assert upstream.count("/item") == 2  # the miss and the uncached call; the hit sent nothing
        assert cache_metric(gw, "gateway_upstream_cache_total", upstream="u", result="hit") == 1
        assert cache_metric(gw, "gateway_upstream_cache_total", upstream="u", result="miss") == 1
        assert cache_metric(gw, "gateway_upstream_cache_entries", upstream="u") == 1
        assert cache_metric(gw, "gateway_upstream_cache_bytes", upstream="u") > 0


async def test_an_entry_expires(upstream: UpstreamServer) -> None:
    # The upstream says nothing: default_ttl_s decides.
    settings = make_settings(upstreams={"u": cached_cfg(upstream.url, {"default_ttl_s": 0.2})})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        assert (await source(client, gw))["cache"] == "miss"
        stored_at = time.monotonic()
        outcomes = []
        while not outcomes or outcomes[-1] == "hit":
            assert time.monotonic() - stored_at < 5, "the entry never expired"
            outcomes.append((await source(client, gw))["cache"])
        assert outcomes[-1] == "miss"
        assert time.monotonic() - stored_at >= 0.2
        assert upstream.count("/item") == 2


async def test_no_store_and_private_answers_are_never_stored(upstream: UpstreamServer) -> None:
    upstream.set("/no-store", Behavior(headers={"Cache-Control": "no-store"}))
    upstream.set("/private", Behavior(headers={"Cache-Control": "private, max-age=60"}))
    upstream.set("/no-cache", Behavior(headers={"Cache-Control": "no-cache, max-age=60"}))
    settings = make_settings(upstreams={"u": cached_cfg(upstream.url, {"default_ttl_s": 60})})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        for path in ("/no-store", "/private", "/no-cache"):
            assert [(await source(client, gw, path))["cache"] for _ in range(2)] == ["miss", "miss"]
            assert upstream.count(path) == 2
        assert cache_metric(gw, "gateway_upstream_cache_entries", upstream="u") == 0


async def test_credentials_are_never_shared_unless_the_upstream_says_public(upstream: UpstreamServer) -> None:
    """Two API keys, each forwarding its own Authorization (and a Cookie) to an upstream that answers with it."""
    echo = ("authorization", "cookie")
    upstream.set("/me", Behavior(echo=echo, headers=FRESH))
    upstream.set("/private", Behavior(echo=echo, headers={"Cache-Control": "private, max-age=60"}))
    upstream.set("/catalogue", Behavior(echo=echo, headers={"Cache-Control": "public, max-age=60"}))
    alice, bob = new_key("alice", ["aggregate"]), new_key("bob", ["aggregate"])
    cfg = cached_cfg(upstream.url, {"default_ttl_s": 60}, forward_headers=["authorization", "cookie"])
    settings = make_settings(upstreams={"u": cfg}, auth=auth_with(alice, bob))
    as_alice = {"headers": {"Authorization": "Bearer alice-token"}, "request_headers": alice.header}
    as_bob = {"headers": {"Authorization": "Bearer bob-token"}, "request_headers": bob.header}
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        for path in ("/me", "/private"):
            a1 = await source(client, gw, path, **as_alice)  # type: ignore[arg-type]
            b1 = await source(client, gw, path, **as_bob)  # type: ignore[arg-type]
            a2 = await source(client, gw, path, **as_alice)  # type: ignore[arg-type]
            assert (
                a1["data"]["headers"]["authorization"] == a2["data"]["headers"]["authorization"] == "Bearer alice-token"
            )
            assert b1["data"]["headers"]["authorization"] == "Bearer bob-token"
            assert [r["cache"] for r in (a1, b1, a2)] == ["miss"] * 3  # not even alice's own answer is kept
            assert upstream.count(path) == 3
        # A cookie is a credential too.
        cookie = {"headers": {"Cookie": "session=alice"}, "request_headers": alice.header}
        c1 = await source(client, gw, "/me", **cookie)  # type: ignore[arg-type]
        c2 = await source(client, gw, "/me", **cookie)  # type: ignore[arg-type]
        assert [c1["cache"], c2["cache"]] == ["miss", "miss"]
        # Marked public: stored once, keyed by nothing private, and served to anyone.
        p1 = await source(client, gw, "/catalogue", **as_alice)  # type: ignore[arg-type]
        p2 = await source(client, gw, "/catalogue", **as_bob)  # type: ignore[arg-type]
        p3 = await source(client, gw, "/catalogue", request_headers=bob.header)
        assert [p["cache"] for p in (p1, p2, p3)] == ["miss", "hit", "hit"]
        assert p2["data"] == p3["data"] == p1["data"]
        assert upstream.count("/catalogue") == 1


async def test_an_answer_stored_without_credentials_never_answers_a_request_with_them(upstream: UpstreamServer) -> None:
    upstream.set("/item", Behavior(echo=("authorization",), headers=FRESH))
    cfg = cached_cfg(upstream.url, forward_headers=["authorization"])
    async with running_gateway(make_settings(upstreams={"u": cfg})) as gw, aiohttp.ClientSession() as client:
        anonymous = await source(client, gw)
        assert (anonymous["cache"], anonymous["data"]["headers"]["authorization"]) == ("miss", None)
        signed = await source(client, gw, headers={"Authorization": "Bearer t"})
        assert (signed["cache"], signed["data"]["headers"]["authorization"]) == ("miss", "Bearer t")
        assert (await source(client, gw))["cache"] == "hit"


async def test_vary_is_honoured(upstream: UpstreamServer) -> None:
    upstream.set("/item", Behavior(echo=("accept-language",), headers={**FRESH, "Vary": "Accept-Language"}))
    cfg = cached_cfg(upstream.url, forward_headers=["accept-language"])
    async with running_gateway(make_settings(upstreams={"u": cfg})) as gw, aiohttp.ClientSession() as client:
        seen = []
        for lang in ("en", "fr", "en", "fr", "EN"):
            result = await source(client, gw, headers={"Accept-Language": lang})
            seen.append((result["cache"], result["data"]["headers"]["accept-language"]))
        assert seen == [("miss", "en"), ("miss", "fr"), ("hit", "en"), ("hit", "fr"), ("miss", "EN")]
        # The header's name is case-insensitive: the same variant whatever its spelling.
        again = await source(client, gw, headers={"ACCEPT-LANGUAGE": "fr"})
        assert (again["cache"], again["data"]["headers"]["accept-language"]) == ("hit", "fr")


async def test_a_header_the_upstream_does_not_vary_on_cannot_poison_another_clients_answer(
    upstream: UpstreamServer,
) -> None:
    # The upstream answers per X-Variant but does not say Vary: a cache keyed by Vary alone would store the
    # attacker's answer for everyone.
    upstream.set("/item", Behavior(echo=("x-variant",), headers=FRESH))
    cfg = cached_cfg(upstream.url, forward_headers=["x-variant"])
    async with running_gateway(make_settings(upstreams={"u": cfg})) as gw, aiohttp.ClientSession() as client:
        attacker = await source(client, gw, headers={"X-Variant": "evil"})
        victim = await source(client, gw)
        assert attacker["data"]["headers"]["x-variant"] == "evil"
        assert (victim["cache"], victim["data"]["headers"]["x-variant"]) == ("miss", None)
        assert (await source(client, gw))["data"]["headers"]["x-variant"] is None
        assert (await source(client, gw, headers={"X-Variant": "evil"}))["cache"] == "hit"


async def test_query_parameters_are_keyed_in_any_order(upstream: UpstreamServer) -> None:
    upstream.set("/item", Behavior(headers=FRESH))
    settings = make_settings(upstreams={"u": cached_cfg(upstream.url)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:

        async def call(params: dict[str, object]) -> str:
            body = {"sources": {"s": {"upstream": "u", "path": "/item", "params": params}}}
            async with client.post(f"{gw.url}/aggregate", json=body) as resp:
                cache: str = (await resp.json())["results"]["s"]["cache"]
                return cache

        assert await call({"a": 1, "b": "x"}) == "miss"
        assert await call({"b": "x", "a": 1}) == "hit"
        assert await call({"a": 2, "b": "x"}) == "miss"
        assert await call({"a": 1}) == "miss"


async def test_least_recently_used_entries_go_first_within_max_bytes(upstream: UpstreamServer) -> None:
    for path in ("/a", "/b", "/c"):
        upstream.set(path, Behavior(body=b"x" * 2000, headers={**FRESH, "Content-Type": "text/plain"}))
    cfg = cached_cfg(upstream.url, {"max_bytes": 5000})  # two entries of about 2.3 KB fit, three do not
    async with running_gateway(make_settings(upstreams={"u": cfg})) as gw, aiohttp.ClientSession() as client:
        assert [(await source(client, gw, p))["cache"] for p in ("/a", "/b", "/a", "/c")] == [
            "miss",
            "miss",
            "hit",
            "miss",
        ]
        # /b was the least recently used when /c came in.
        assert [(await source(client, gw, p))["cache"] for p in ("/a", "/c", "/b")] == ["hit", "hit", "miss"]
        assert cache_metric(gw, "gateway_upstream_cache_evictions_total", upstream="u") == 2
        assert cache_metric(gw, "gateway_upstream_cache_entries", upstream="u") == 2
        assert cache_metric(gw, "gateway_upstream_cache_bytes", upstream="u") <= 5000


async def test_a_body_larger_than_the_budget_is_simply_not_stored(upstream: UpstreamServer) -> None:
    big = b"y" * (10 * 1024 * 1024)
    upstream.set("/big", Behavior(body=big, headers={**FRESH, "Content-Type": "text/plain"}, mode="stream"))
    upstream.set("/small", Behavior(headers=FRESH))
    cfg = cached_cfg(upstream.url, {"max_bytes": 1024 * 1024}, max_response_bytes=16 * 1024 * 1024, timeout_ms=5000)
    async with running_gateway(make_settings(upstreams={"u": cfg})) as gw, aiohttp.ClientSession() as client:
        assert (await source(client, gw, "/small"))["cache"] == "miss"
        for _ in range(2):
            result = await source(client, gw, "/big", deadline_ms=5000)
            assert (result["ok"], result["cache"], len(result["data"])) == (True, "miss", len(big))
        assert upstream.count("/big") == 2
        assert (await source(client, gw, "/small"))["cache"] == "hit"  # nothing was evicted for it
        assert cache_metric(gw, "gateway_upstream_cache_bytes", upstream="u") < 1024 * 1024
        assert cache_metric(gw, "gateway_upstream_cache_evictions_total", upstream="u") == 0


async def test_only_get_and_head_without_a_body_are_cached(upstream: UpstreamServer) -> None:
    upstream.set("/item", Behavior(headers=FRESH))
    settings = make_settings(upstreams={"u": cached_cfg(upstream.url)})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        for spec in ({"method": "POST"}, {"method": "GET", "json": {"q": 1}}):
            body = {"sources": {"s": {"upstream": "u", "path": "/item", **spec}}}
            for _ in range(2):
                async with client.post(f"{gw.url}/aggregate", json=body) as resp:
                    assert (await resp.json())["results"]["s"]["cache"] is None
        assert upstream.count("/item") == 4
        heads = []
        for _ in range(2):
            body = {"sources": {"s": {"upstream": "u", "path": "/item", "method": "HEAD"}}}
            async with client.post(f"{gw.url}/aggregate", json=body) as resp:
                heads.append((await resp.json())["results"]["s"]["cache"])
        assert heads == ["miss", "hit"]
        assert (await source(client, gw, "/item"))["cache"] == "miss"  # GET and HEAD are keyed apart


async def test_a_client_no_cache_goes_to_the_upstream_and_refreshes_the_entry(upstream: UpstreamServer) -> None:
    upstream.set("/item", Behavior(headers=FRESH))
    cfg = cached_cfg(upstream.url, forward_headers=["cache-control"])
    async with running_gateway(make_settings(upstreams={"u": cfg})) as gw, aiohttp.ClientSession() as client:
        no_store = {"Cache-Control": "no-store"}
        assert [(await source(client, gw, headers=no_store))["cache"] for _ in range(2)] == ["miss", "miss"]
        no_cache = {"Cache-Control": "no-cache"}
        assert [(await source(client, gw, headers=no_cache))["cache"] for _ in range(2)] == ["miss", "miss"]
        assert upstream.count("/item") == 4


async def test_many_sources_of_one_aggregate_share_one_call_without_a_cache(upstream: UpstreamServer) -> None:
    # Coalescing on its own: identical sources share one call, and nothing is kept for the next request.
    upstream.set("/item", Behavior(latency=0.05))
    cfg = upstream_cfg(upstream.url, cache={"coalesce": True})
    async with running_gateway(make_settings(upstreams={"u": cfg})) as gw, aiohttp.ClientSession() as client:
        sources = {f"s{i}": {"upstream": "u", "path": "/item"} for i in range(5)}
        for round_ in range(2):
            async with client.post(f"{gw.url}/aggregate", json={"sources": sources}) as resp:
                results = (await resp.json())["results"]
            assert sorted(r["cache"] for r in results.values()) == ["coalesced"] * 4 + ["miss"]
            assert all(r["ok"] and r["data"] == {"path": "/item", "ok": True} for r in results.values())
            assert sum(r["attempts"] for r in results.values()) == 1
            assert upstream.count("/item") == round_ + 1
        assert cache_metric(gw, "gateway_upstream_cache_total", upstream="u", result="coalesced") == 8


async def test_the_cache_field_is_in_the_openapi_document() -> None:
    settings = make_settings()
    async with (
        running_gateway(settings) as gw,
        aiohttp.ClientSession() as client,
        client.get(f"{gw.url}/openapi.json") as resp,
    ):
        doc = await resp.json()
    cache = doc["components"]["schemas"]["SourceResult"]["properties"]["cache"]
    values = {v for option in cache["anyOf"] for v in option.get("enum", [])}
    assert values == {"hit", "miss", "coalesced", "stale"}
    assert "cache" in doc["components"]["schemas"]["SourceResult"]["required"]


async def test_an_upstream_without_cache_settings_keeps_no_cache_layer(upstream: UpstreamServer) -> None:
    upstream.set("/item", Behavior(headers=FRESH))
    settings = make_settings(
        upstreams={"u": upstream_cfg(upstream.url), "c": cached_cfg(upstream.url)}, observability={"admin_port": 0}
    )
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        ups = gw.state.upstreams.upstreams
        assert ups["u"].cache is None  # decided at start-up: its calls go straight to the upstream
        assert ups["c"].cache is not None
        await source(client, gw, upstream="c")
        async with client.get(f"http://127.0.0.1:{gw.state.admin_port}/debug/pools") as resp:
            pools = (await resp.json())["upstreams"]
    assert pools["u"]["cache"] is None
    held = pools["c"]["cache"]
    assert (held["store"], held["entries"], held["flights"], held["waiters"]) == ("memory", 1, 0, 0)
    assert held["bytes"] > 0
