"""The OpenAPI document describes the configuration served: upstream and query names, each query's typed
parameters, each composite as its own path with its typed query parameters; POST /aggregate is one route."""

from __future__ import annotations

from typing import Any

import aiohttp
from starlette.routing import Route

from app.main import create_app
from tests.aggregate.conftest import upstream_cfg
from tests.support.gateway import make_settings, running_gateway
from tests.support.upstream import Behavior, UpstreamServer

DSN = "postgresql://gateway@127.0.0.1:1/unused"  # never connected: the document is built without the lifespan


def settings(**extra: Any) -> Any:
    return make_settings(
        database_url=DSN,
        upstreams={
            "users": {"base_url": "http://127.0.0.1:1", "forward_headers": ["x-trace"]},
            "inventory": {"base_url": "http://127.0.0.1:2"},
        },
        queries={"recent": {"sql": "SELECT %(user_id)s, %(tag)s", "params": {"user_id": "int", "tag": "str"}}},
        composites={
            "overview": {
                "params": {"user_id": "int", "sku": "str", "fast": "bool"},
                "sources": {"stock": {"upstream": "inventory", "path": "/stock/{sku}", "params": {"f": "{fast}"}}},
            }
        },
        **extra,
    )


def schemas(doc: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = doc["components"]["schemas"]
    return result


def test_sources_name_only_configured_upstreams_and_queries() -> None:
    doc = create_app(settings()).openapi()
    body = doc["paths"]["/aggregate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    request = schemas(doc)[body["$ref"].rsplit("/", 1)[-1]]
    sources = request["properties"]["sources"]
    assert sources["maxProperties"] == 16
    assert sources["additionalProperties"] is False
    (choices,) = sources["patternProperties"].values()
    refs = sorted(ref["$ref"].rsplit("/", 1)[-1] for ref in choices["oneOf"])
    assert refs == ["QuerySource_recent", "UpstreamSource_inventory", "UpstreamSource_users"]
    users = schemas(doc)["UpstreamSource_users"]["properties"]
    assert users["upstream"] == {"const": "users"}
    assert list(users["headers"]["patternProperties"]) == ["^(?:[xX]\\-[tT][rR][aA][cC][eE])$"]
    assert schemas(doc)["UpstreamSource_inventory"]["properties"]["headers"]["maxProperties"] == 0
    query = schemas(doc)["QuerySource_recent"]
    assert query["required"] == ["query", "params"]
    assert query["properties"]["query"] == {"const": "recent"}
    params = query["properties"]["params"]
    assert params["required"] == ["tag", "user_id"]
    assert params["additionalProperties"] is False
    assert params["properties"]["user_id"]["type"] == "integer"
    assert params["properties"]["tag"]["type"] == "string"
    assert "UpstreamSourceSpec" not in schemas(doc)


def test_each_composite_is_a_path_with_its_typed_parameters() -> None:
    doc = create_app(settings()).openapi()
    assert "/aggregate/{composite}" not in doc["paths"]
    operation = doc["paths"]["/aggregate/overview"]["get"]
    params = {p["name"]: (p["in"], p["required"], p["schema"]) for p in operation["parameters"]}
    assert params["user_id"][:2] == ("query", True)
    assert params["user_id"][2]["type"] == "integer"
    assert params["fast"][2] == {"type": "boolean"}
    # It fills a path segment alone: never empty, '.' or '..'.
    assert params["sku"][2] == {
        "type": "string",
        "pattern": "^[^/\\\\\\x00-\\x1f\\x7f]*$",
        "minLength": 1,
        "not": {"enum": [".", ".."]},
    }


def test_post_aggregate_is_one_route() -> None:
    app = create_app(settings())
    routes = [r for r in app.routes if isinstance(r, Route) and r.path == "/aggregate"]
    assert len(routes) == 1
    assert routes[0].methods == {"POST"}
    assert list(app.openapi()["paths"]["/aggregate"]) == ["post"]


async def test_a_composite_value_stays_in_its_segment(upstream: UpstreamServer) -> None:
    # Percent-encoded whole and never decoded again: '?', '#' and '%' stay in the path, as data.
    upstream.set("/stock/a b?#%41", Behavior(json={"sku": "a b?#%41"}))
    config = make_settings(
        upstreams={"inventory": upstream_cfg(upstream.url)},
        composites={
            "stock": {"params": {"sku": "str"}, "sources": {"s": {"upstream": "inventory", "path": "/stock/{sku}"}}}
        },
    )
    async with running_gateway(config) as gw, aiohttp.ClientSession() as client:
        async with client.get(f"{gw.url}/aggregate/stock", params={"sku": "a b?#%41"}) as resp:
            body = await resp.json()
        for bad in ("", ".", "..", "a/b", "../x", "a\\b", "a\x00"):
            async with client.get(f"{gw.url}/aggregate/stock", params={"sku": bad}) as resp:
                refused = await resp.json(content_type=None)
            assert (resp.status, refused["errors"][0]["loc"]) == (422, "query.sku"), refused
    assert body["results"]["s"]["data"] == {"sku": "a b?#%41"}, body
    assert upstream.count() == 1


def test_the_document_describes_references_and_the_closed_set_of_error_types() -> None:
    from app import errors

    doc = create_app(settings()).openapi()
    request = schemas(doc)["AggregateRequest"]
    assert "${profile.data.org_id}" in request["properties"]["sources"]["description"]
    assert "dependency_failed" in request["properties"]["sources"]["description"]
    error_type = schemas(doc)["SourceErrorBody"]["properties"]["type"]
    # Every kind a SourceError can report, but the two abstract bases'.
    leaves = {
        cls.kind for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.SourceError)
    } - {errors.SourceError.kind, errors.UpstreamError.kind}
    assert set(error_type["enum"]) == leaves
    assert {"dependency_failed", "too_many_items"} <= leaves
    assert "dependency_failed" in error_type["description"]
    result = schemas(doc)["SourceResult"]
    assert {"started_ms", "waited_for"} <= set(result["required"])
