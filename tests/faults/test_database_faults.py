"""PostgreSQL faults against a real `gateway serve`: a throwaway server restarted under running queries, and queries
that outrun their statement_timeout. The shared test database is never touched."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import aiohttp
import pytest

from app.demo.postgres import EmbeddedPostgres, load_demo_seed, seed
from tests.faults.support import aggregate, config, healthz_ms, serve
from tests.security.conftest import metric
from tests.support.gateway import GatewayProcess
from tests.support.postgres import active_gateway_queries

QUERIES = {
    "sleep": {"sql": "SELECT true AS slept FROM pg_sleep(%(s)s)", "params": {"s": "float"}, "timeout_ms": 30_000},
    "user": {"sql": "SELECT id, name FROM users WHERE id = %(id)s", "params": {"id": "int"}},
    "runaway": {"sql": "SELECT true AS never FROM pg_sleep(30)", "timeout_ms": 300},
}


@pytest.fixture(scope="module")
def pg() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres() as server:
        seed(server.dsn, load_demo_seed())
        yield server


@pytest.fixture(scope="module")
def gateway(pg: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    data = config(
        queries=QUERIES,
        database={"executor_threads": 8, "queue_limit": 16, "min_connections": 4},
        limits={"max_deadline_ms": 30_000},
    )
    with serve(tmp_path_factory.mktemp("dbfaults"), data, env={"GATEWAY_DATABASE_URL": pg.dsn}) as gw:
        yield gw


async def wait_until(predicate: Callable[[], bool], what: str, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


USER = {"u": {"query": "user", "params": {"id": 3}}}


async def test_postgres_restarted_during_queries(gateway: GatewayProcess, pg: EmbeddedPostgres) -> None:
    # Client sees: the queries running when the server goes down end at once with 200 and a `db_unavailable`
    # (or `db_error`) source, not at their deadline and never as a 500; while it is down, every query fails fast
    # with `db_unavailable`, other routes answer; once it is back, the very next query is served.
    async with aiohttp.ClientSession() as client:
        status, body, _ = await aggregate(client, gateway, USER)
        assert body["complete"] is True, body
        running = [
            asyncio.create_task(aggregate(client, gateway, {"s": {"query": "sleep", "params": {"s": 20}}}, 25_000))
            for _ in range(6)
        ]
        await wait_until(lambda: active_gateway_queries(pg.dsn) >= 6, "the queries to run")
        stopped_at = time.perf_counter()
        await asyncio.to_thread(pg.stop)
        cut = await asyncio.gather(*running)
        for status, body, _ in cut:
            assert status == 200
            assert body["results"]["s"]["error"]["type"] in ("db_unavailable", "db_error"), body
        assert time.perf_counter() - stopped_at < 5, "running queries must end with the server, not at the deadline"

        for _ in range(5):
            status, body, elapsed = await aggregate(client, gateway, USER)
            assert status == 200
            assert body["results"]["u"]["error"]["type"] == "db_unavailable"
            assert elapsed < 1.0
            assert await healthz_ms(client, gateway) < 100

        await asyncio.to_thread(pg.start)
        status, body, _ = await aggregate(client, gateway, USER)
        assert body["complete"] is True, body
        assert body["results"]["u"]["data"] == [{"id": 3, "name": body["results"]["u"]["data"][0]["name"]}]
        concurrent = await asyncio.gather(*(aggregate(client, gateway, USER) for _ in range(12)))
        assert all(b["complete"] for _, b, _ in concurrent)
        async with client.get(f"{gateway.url}/metrics") as resp:
            text = await resp.text()
    assert metric(text, "gateway_db_executor_busy") == 0


async def test_query_past_its_statement_timeout(gateway: GatewayProcess, pg: EmbeddedPostgres) -> None:
    # Client sees: 200 after about 300 ms with the source failed as `timeout`; the server really stopped the
    # query; the connection went back to the pool clean, so the queries that follow (and those alongside) work.
    async with aiohttp.ClientSession() as client:
        started = time.perf_counter()
        both = await asyncio.gather(
            *(aggregate(client, gateway, {"r": {"query": "runaway"}}) for _ in range(4)),
            *(aggregate(client, gateway, USER) for _ in range(4)),
        )
        elapsed = time.perf_counter() - started
        for status, body, _ in both[:4]:
            assert status == 200
            assert body["results"]["r"]["error"]["type"] == "timeout", body
        assert all(body["complete"] for _, body, _ in both[4:])
        assert elapsed < 2.0
        await wait_until(lambda: active_gateway_queries(pg.dsn) == 0, "the server to have no query left", 3)
        for _ in range(8):  # more than the pool: every connection the timeouts touched is reused
            _, body, _ = await aggregate(client, gateway, USER)
            assert body["complete"] is True, body


def test_no_traceback_in_the_log(gateway: GatewayProcess) -> None:
    assert "Traceback" not in gateway.stderr()
