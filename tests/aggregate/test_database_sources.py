"""Database sources: server-side cancellation, no query left behind, outage and recovery."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from app.demo.postgres import EmbeddedPostgres, load_demo_seed, seed
from tests.aggregate.conftest import post_aggregate
from tests.support.gateway import make_settings, running_gateway
from tests.support.postgres import active_gateway_queries

# Marked, so that only this run's queries are counted on a server other runs may share.
MARKER = f"/* gwtest {uuid.uuid4().hex} */"
SLEEP = {
    "sleep": {
        "sql": f"SELECT true AS slept FROM pg_sleep(%(s)s) {MARKER}",
        "params": {"s": "float"},
        "timeout_ms": 60_000,
    }
}
USERS = {"users": {"sql": "SELECT id, name FROM users WHERE id = %(id)s", "params": {"id": "int"}}}


async def test_deadline_cancels_the_query_on_the_server(pg_dsn: str, pg_server_url: str) -> None:
    settings = make_settings(database_url=pg_dsn, queries=SLEEP, limits={"max_deadline_ms": 60_000})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        started = time.perf_counter()
        _, body, _ = await post_aggregate(
            client, gw.url, {"s": {"query": "sleep", "params": {"s": 30}}}, deadline_ms=300
        )
        assert time.perf_counter() - started < 1.0
        assert body["results"]["s"]["error"]["type"] in ("deadline", "timeout")
        executor = gw.state.db.executor
        deadline = time.monotonic() + 5
        while executor.stats().busy or active_gateway_queries(pg_server_url, MARKER):
            assert time.monotonic() < deadline, "the query kept running on the server"
            await asyncio.sleep(0.02)
        # The connection came back usable.
        _, body, _ = await post_aggregate(client, gw.url, {"s": {"query": "sleep", "params": {"s": 0}}})
        assert body["results"]["s"]["data"] == [{"slept": True}]


async def test_client_disconnect_cancels_the_query(pg_dsn: str, pg_server_url: str) -> None:
    settings = make_settings(database_url=pg_dsn, queries=SLEEP, limits={"max_deadline_ms": 60_000})
    async with running_gateway(settings) as gw:
        async with aiohttp.ClientSession() as client:
            task = asyncio.create_task(
                post_aggregate(client, gw.url, {"s": {"query": "sleep", "params": {"s": 30}}}, deadline_ms=60_000)
            )
            deadline = time.monotonic() + 5
            while not active_gateway_queries(pg_server_url, MARKER):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        deadline = time.monotonic() + 5
        while active_gateway_queries(pg_server_url, MARKER) or gw.state.db.executor.stats().busy:
            assert time.monotonic() < deadline, "the query outlived its disconnected client"
            await asyncio.sleep(0.02)


@pytest.fixture
def throwaway_pg() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres() as pg:
        seed(pg.dsn, load_demo_seed())
        yield pg


@pytest.mark.timeout(90)
async def test_database_outage_then_recovery(throwaway_pg: EmbeddedPostgres) -> None:
    settings = make_settings(database_url=throwaway_pg.dsn, queries=USERS, database={"min_connections": 2})
    source: dict[str, Any] = {"u": {"query": "users", "params": {"id": 3}}}
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        _, body, _ = await post_aggregate(client, gw.url, source)
        assert body["results"]["u"]["data"][0]["id"] == 3

        await asyncio.to_thread(throwaway_pg.stop)
        started = time.perf_counter()
        _, body, _ = await post_aggregate(client, gw.url, source)
        assert time.perf_counter() - started < 1.0
        assert body["results"]["u"]["error"]["type"] == "db_unavailable"
        assert (await client.get(f"{gw.url}/healthz")).status == 200

        await asyncio.to_thread(throwaway_pg.start)
        # Pooled connections died with the server: the gateway recovers by itself, on the first request.
        _, body, _ = await post_aggregate(client, gw.url, source)
        assert body["results"]["u"]["ok"] is True, body
        assert body["results"]["u"]["data"][0]["id"] == 3
