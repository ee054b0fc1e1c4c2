"""POST /transform/{name} as its OpenAPI document says: params an object when given (never null), data never null,
params taken as JSON typed them, duplicate keys refused with 422."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from tests.compute.helpers import compute_settings, shm_guard
from tests.support.gateway import RunningGateway, running_gateway

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


async def test_the_document_says_data_is_never_null_and_params_an_object(gw: RunningGateway) -> None:
    async with aiohttp.ClientSession() as client, client.get(f"{gw.url}/openapi.json") as resp:
        doc = await resp.json()
    body = doc["paths"]["/transform/{name}"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["params"]["type"] == "object"
    ranks = body["properties"]["data"]["anyOf"]
    assert ranks[0] == {"type": "number"}
    assert ranks[1] == {"type": "array", "minItems": 1, "items": {"type": "number"}}
    assert all("null" not in orjson.dumps(rank).decode() for rank in ranks)
