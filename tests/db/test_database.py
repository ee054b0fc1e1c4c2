"""The DB executor and pool against a real PostgreSQL: queries run off the loop, bounded, with timeouts."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from tests.support.gateway import make_settings, running_gateway

QUERIES: dict[str, Any] = {
    "orders_of": {
        "sql": "SELECT id, total FROM orders WHERE user_id = %(user_id)s ORDER BY id",
        "params": {"user_id": "int"},
    },
    "sleep": {"sql": "SELECT true AS slept FROM pg_sleep(%(s)s)", "params": {"s": "float"}, "timeout_ms": 5000},
}


def db_settings(pg_dsn: str, **database: Any) -> Any:
    return make_settings(
        database_url=pg_dsn,
        queries=QUERIES,
        database=database,
        limits={"max_deadline_ms": 10_000, "default_deadline_ms": 5_000},
    )


async def aggregate(client: aiohttp.ClientSession, url: str, sources: dict[str, Any], **extra: Any) -> Any:
    async with client.post(f"{url}/aggregate", json={"sources": sources, **extra}) as resp:
        return resp.status, await resp.json()


async def test_query_returns_typed_rows(pg_dsn: str) -> None:
    async with running_gateway(db_settings(pg_dsn)) as gw, aiohttp.ClientSession() as client:
        status, body = await aggregate(client, gw.url, {"o": {"query": "orders_of", "params": {"user_id": 3}}})
    assert status == 200, body
    result = body["results"]["o"]
    assert result["ok"]
    assert result["error"] is None
    assert len(result["data"]) == 5
    assert all(isinstance(row["id"], int) and isinstance(row["total"], str) for row in result["data"])


async def test_slow_query_does_not_delay_healthz(pg_dsn: str) -> None:
    async with running_gateway(db_settings(pg_dsn)) as gw, aiohttp.ClientSession() as client:
        slow = asyncio.create_task(aggregate(client, gw.url, {"s": {"query": "sleep", "params": {"s": 1.0}}}))
        # Wait until the query really runs in an executor thread, then probe the loop.
        deadline = time.monotonic() + 5
        while gw.state.db.executor.stats().busy == 0:
            assert time.monotonic() < deadline, "the query never reached the executor"
            await asyncio.sleep(0.01)
        worst = 0.0
        for _ in range(10):
            started = time.perf_counter()
            async with client.get(f"{gw.url}/healthz") as resp:
                assert resp.status == 200
            worst = max(worst, time.perf_counter() - started)
        assert not slow.done(), "the probes must overlap the slow query"
        status, body = await slow
    assert status == 200
    assert body["results"]["s"]["data"] == [{"slept": True}]
    assert worst < 0.1, f"/healthz took {worst * 1000:.0f} ms while a query ran"


async def test_statement_timeout_cancels_on_the_server(pg_dsn: str) -> None:
    async with running_gateway(db_settings(pg_dsn)) as gw, aiohttp.ClientSession() as client:
        status, body = await aggregate(client, gw.url, {"s": {"query": "sleep", "params": {"s": 3}}}, deadline_ms=300)
        assert status == 200
        result = body["results"]["s"]
        assert result["ok"] is False
        assert result["error"]["type"] in ("timeout", "deadline")
        assert result["elapsed_ms"] < 1500
        # The connection went back to the pool usable: the next query on it succeeds.
        status, body = await aggregate(client, gw.url, {"o": {"query": "orders_of", "params": {"user_id": 1}}})
        assert body["results"]["o"]["ok"], body


async def test_full_executor_fails_fast_as_overloaded(pg_dsn: str) -> None:
    settings = db_settings(pg_dsn, executor_threads=1, queue_limit=1, min_connections=1)
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        sources = {f"s{i}": {"query": "sleep", "params": {"s": 0.5}} for i in range(4)}
        started = time.perf_counter()
        _status, body = await aggregate(client, gw.url, sources)
        elapsed = time.perf_counter() - started
    kinds = sorted((r["error"] or {}).get("type", "ok") for r in body["results"].values())
    assert kinds == ["ok", "ok", "overloaded", "overloaded"], body
    assert elapsed < 1.6
    # A query refused by the full queue never reached the server: no attempt.
    attempts = sorted((r["ok"], r["attempts"]) for r in body["results"].values())
    assert attempts == [(False, 0), (False, 0), (True, 1), (True, 1)]


@pytest.mark.parametrize("params", [{"user_id": "1; DROP TABLE orders"}, {"user_id": 1, "extra": 2}, {}])
async def test_bad_query_params_are_a_422(pg_dsn: str, params: dict[str, Any]) -> None:
    async with running_gateway(db_settings(pg_dsn)) as gw, aiohttp.ClientSession() as client:
        status, body = await aggregate(client, gw.url, {"o": {"query": "orders_of", "params": params}})
        assert status == 422
        assert body["type"] == "urn:gateway:problem:validation"
        assert all(e["loc"] == "sources.o.params" for e in body["errors"])
        status, body = await aggregate(client, gw.url, {"o": {"query": "orders_of", "params": {"user_id": 1}}})
        assert len(body["results"]["o"]["data"]) == 5  # the table is intact
