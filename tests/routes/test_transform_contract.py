"""POST /transform/{name} as its OpenAPI document says: params an object when given (never null), data never null,
params taken as JSON typed them, duplicate keys refused with 422."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from app.main import create_app
from tests.compute.helpers import compute_settings, shm_guard
from tests.support.gateway import RunningGateway, make_settings, running_gateway

pytestmark = pytest.mark.usefixtures("shm_guard")
__all__ = ["shm_guard"]


@pytest.fixture
async def gw() -> AsyncIterator[RunningGateway]:
    async with running_gateway(compute_settings(workers=1, load_plugins=False)) as gateway:
        yield gateway


async def post(gw: RunningGateway, name: str, raw: bytes) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"{gw.url}/transform/{name}", data=raw, headers=headers) as resp,
    ):
        return resp.status, orjson.loads(await resp.read())


@pytest.mark.parametrize(
    ("name", "raw", "problem"),
    [
        ("stats", b'{"data": [0.5, 1, 2], "params": null}', "invalid-params"),
        ("trig_log", b'{"data": null}', "non-numeric-data"),
        ("stats", b'{"data": [0.5, 1, 2], "params": {"ddof": "1"}}', "invalid-params"),
        ("stats", b'{"data": [0.5, 1, 2], "params": {"percentiles": ["50"]}}', "invalid-params"),
        ("sort", b'{"data": [2, 1], "params": {"descending": 1}}', "invalid-params"),
        ("stats", b'{"data": [1, 2], "params": {"ddof": 0, "ddof": 1}}', "invalid-params"),
        ("trig_log", b'{"data": [1], "data": [2]}', "validation"),
    ],
)
async def test_what_the_document_refuses_is_refused_with_422(
    gw: RunningGateway, name: str, raw: bytes, problem: str
) -> None:
    status, body = await post(gw, name, raw)
    assert (status, body["type"]) == (422, f"urn:gateway:problem:{problem}"), body


async def test_what_the_document_allows_is_taken(gw: RunningGateway) -> None:
    status, body = await post(gw, "stats", b'{"data": [0.5, 1, 2], "params": {"percentiles": [50, 90.5], "ddof": 1}}')
    assert status == 200, body
    assert set(body["result"]["percentiles"]) == {"50", "90.5"}
    status, body = await post(gw, "sort", b'{"data": [2, 1]}')
    assert (status, body["result"]) == (200, [1, 2])


async def test_the_document_lists_each_transform_with_its_data_and_params(gw: RunningGateway) -> None:
    async with aiohttp.ClientSession() as client, client.get(f"{gw.url}/openapi.json") as resp:
        doc = await resp.json()

    def body(name: str) -> Any:
        return doc["paths"][f"/transform/{name}"]["post"]["requestBody"]["content"]["application/json"]["schema"]

    assert "/transform/{name}" not in doc["paths"]
    assert "/transform/json_digest" not in doc["paths"]  # the gateway's own work, never callable
    # Never null: a number or lists of numbers, to the ranks each transform takes; params an object.
    trig_log, stats, primes = body("trig_log"), body("stats"), body("prime_count")
    assert trig_log["properties"]["data"]["anyOf"][0]["type"] == "number"
    assert len(trig_log["properties"]["data"]["anyOf"]) == 9  # ranks 0 to 8
    assert stats["properties"]["data"]["anyOf"][0] == {"type": "array", "minItems": 1, "items": {"type": "number"}}
    assert stats["properties"]["params"]["properties"]["ddof"]["maximum"] == 1
    assert stats["properties"]["params"]["type"] == "object"
    assert primes["properties"]["data"]["anyOf"][1]["items"] == {"type": "integer"}
    assert all("null" not in orjson.dumps(b["properties"]["data"]).decode() for b in (trig_log, stats, primes))


def test_without_transforms_the_document_keeps_the_generic_path() -> None:
    paths = create_app(make_settings(compute={"enabled": False})).openapi()["paths"]
    assert [p for p in paths if p.startswith("/transform/")] == ["/transform/{name}"]
