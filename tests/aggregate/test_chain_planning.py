"""Bad graphs are refused before anything is sent: 422, each problem located and typed."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.aggregate.conftest import post_aggregate, upstream_cfg
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import UpstreamServer

QUERIES = {"orders_of": {"sql": "SELECT id FROM orders WHERE user_id = %(user_id)s", "params": {"user_id": "int"}}}


def up(path: str, **extra: Any) -> dict[str, Any]:
    return {"upstream": "a", "path": path, **extra}


CASES = [
    pytest.param(
        {"p": up("/users/7"), "o": up("/orgs/${profil.data.org_id}")},
        [("sources.o.path", "unknown_source", "'${profil.data.org_id}' names no source of this aggregate ('profil')")],
        id="unknown",
    ),
    pytest.param(
        {"a": up("/a/${b.data.x}"), "b": up("/b", params={"k": "${a.data.y}"})},
        [("sources.a.path", "cycle", "references make a cycle: a → b → a")],
        id="cycle",
    ),
    pytest.param(
        {"a": up("/a/${a.data.x}")},
        [("sources.a.path", "cycle", "references make a cycle: a → a")],
        id="self",
    ),
    pytest.param(
        {
            "a": up("/a"),
            "b": up("/b/${a.data.x}"),
            "c": up("/c/${b.data.x}"),
            "d": up("/d/${c.data.x}"),
            "e": up("/e/${d.data.x}"),
        },
        [
            (
                "sources.e.path",
                "chain_too_deep",
                "e ends a chain of 5 sources, over limits.max_chain_depth (4)",
            )
        ],
        id="too-deep",
    ),
    pytest.param(
        {"h": up("/h", method="HEAD"), "o": up("/o", headers={"x-tenant": "${h.data.t}"})},
        [("sources.o.headers.x-tenant", "reference_to_head", None)],
        id="head",
    ),
    pytest.param(
        {"p": up("/p"), "o": up("/o/${p.org_id}")},
        [("sources.o.path", "bad_reference", None)],
        id="no-data",
    ),
    pytest.param({"p": up("/p"), "o": up("/o/${p.data.x")}, [("sources.o.path", "bad_reference", None)], id="open"),
    pytest.param(
        {"p": up("/p"), "o": up("/o/${p.data.x + 1}")},
        [("sources.o.path", "bad_reference", None)],
        id="expression",
    ),
    pytest.param(
        {"p": up("/p"), "o": up("/o/${p.data[*].x}")},
        [("sources.o.path", "bad_reference", "'${p.data[*].x}': '[*]' is for for_each alone")],
        id="star-outside-for-each",
    ),
    pytest.param(
        {"p": up("/p"), "o": up("/o/${each}")},
        [("sources.o.path", "bad_reference", "'${each}' is for a source with for_each")],
        id="each-without-for-each",
    ),
    pytest.param(
        {"p": up("/p"), "o": up("/o/${each}", for_each="${p.data.ids}")},
        [("sources.o.for_each", "bad_reference", None)],
        id="for-each-without-star",
    ),
    pytest.param(
        {"p": up("/p"), "o": up("/o/${each}", for_each="${p.data[*]}", max_items=17)},
        [("sources.o.max_items", "too_many_items", "max_items is at most limits.max_sources (16)")],
        id="max-items-over-max-sources",
    ),
    pytest.param(
        {"p": up("/p"), "o": up("/o", max_items=3)},
        [("sources.o.max_items", "bad_reference", "max_items goes with for_each")],
        id="max-items-alone",
    ),
    pytest.param(
        {"p": up("/p"), "o": up("/../${p.data.x}")},
        [("sources.o.path", "unsafe_path", None)],
        id="unsafe-literal",
    ),
    pytest.param(
        {"p": up("/p"), "q": {"query": "orders_of", "params": {"user_id": "${p.data.id}", "extra": "${p.data.x}"}}},
        [("sources.q.params", "bad_param", "unknown parameter 'extra'")],
        id="query-unknown-param",
    ),
    pytest.param(
        {"p": up("/p", json={"deep": ["${nope.data.x}"]})},
        [("sources.p.json.deep[0]", "unknown_source", None)],
        id="json-body",
    ),
]


@pytest.mark.parametrize(("sources", "expected"), CASES)
async def test_bad_graphs_are_refused_and_located(
    upstream: UpstreamServer, pg_dsn: str, sources: dict[str, Any], expected: list[tuple[str, str, str | None]]
) -> None:
    settings = make_settings(
        database_url=pg_dsn, queries=QUERIES, upstreams={"a": upstream_cfg(upstream.url, forward_headers=["x-tenant"])}
    )
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        status, body, headers = await post_aggregate(client, gw.url, sources)
    assert status == 422, body
    assert headers["Content-Type"] == "application/problem+json"
    assert body["type"] == "urn:gateway:problem:validation"
    assert [(e["loc"], e["type"]) for e in body["errors"]] == [(loc, type_) for loc, type_, _ in expected], body
    for error, (_, _, msg) in zip(body["errors"], expected, strict=True):
        if msg is not None:
            assert error["msg"] == msg
    assert upstream.count() == 0, "nothing is sent for a refused request"


async def test_every_problem_at_once(upstream: UpstreamServer) -> None:
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)})
    sources = {"a": up("/a/${b.data.x}"), "b": up("/b/${a.data.x}"), "c": up("/c/${zz.data.x}")}
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        status, body, _ = await post_aggregate(client, gw.url, sources)
    assert status == 422
    assert sorted(e["type"] for e in body["errors"]) == ["cycle", "unknown_source"]


async def test_a_deeper_chain_is_taken_when_the_limit_allows_it(upstream: UpstreamServer) -> None:
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)}, limits={"max_chain_depth": 2})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        ok_status, _, _ = await post_aggregate(client, gw.url, {"a": up("/a"), "b": up("/b/${a.data.path}")})
        status, body, _ = await post_aggregate(
            client, gw.url, {"a": up("/a"), "b": up("/b/${a.data.ok}"), "c": up("/c/${b.data.ok}")}
        )
    assert ok_status == 200
    assert (status, body["errors"][0]["type"]) == (422, "chain_too_deep")


async def test_an_escaped_reference_is_literal_text(upstream: UpstreamServer) -> None:
    settings = make_settings(upstreams={"a": upstream_cfg(upstream.url)})
    sources = {"t": up("/t", params={"q": "$${not.a.reference}"}, json={"template": "Hello $${name}"})}
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        status, body, _ = await post_aggregate(client, gw.url, sources)
    assert (status, body["complete"]) == (200, True), body
    (sent,) = upstream.requests
    assert sent.query == {"q": "${not.a.reference}"}
    assert sent.body == b'{"template":"Hello ${name}"}'
