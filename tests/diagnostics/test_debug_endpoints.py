"""Operator endpoints against a real running gateway under load, on the admin listener, and on the public one for
`admin` keys."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import aiohttp
import pytest

from tests.aggregate.conftest import post_aggregate
from tests.security.conftest import auth_with, new_key
from tests.support.gateway import make_settings, running_gateway


async def get_json(client: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with client.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


async def stuck_forever_waiting(event: asyncio.Event) -> None:
    await event.wait()


async def test_stuck_coroutine_appears_in_tasks() -> None:
    settings = make_settings(observability={"admin_port": 0}, diagnostics={"task_census_interval_s": 0.01})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        admin = f"http://127.0.0.1:{gw.state.admin_port}"
        never = asyncio.Event()
        stuck = asyncio.create_task(stuck_forever_waiting(never), name="the-stuck-one")
        # Until a census has seen it at least 40 ms ago (it runs every 10 ms): polled, as a loaded machine may
        # delay the census.
        deadline = time.monotonic() + 10
        while True:
            status, body = await get_json(client, f"{admin}/debug/tasks")
            seen = [t for t in body["tasks"] if t["name"] == "the-stuck-one"]
            if seen and seen[0]["age_s"] >= 0.04:
                break
            assert time.monotonic() < deadline, body
            await asyncio.sleep(0.01)
        never.set()
        await stuck
        # Never anonymously on the public listener.
        async with client.get(f"{gw.url}/debug/tasks") as resp:
            assert resp.status == 404
    assert status == 200
    (task,) = [t for t in body["tasks"] if t["name"] == "the-stuck-one"]
    assert task["coroutine"] == "stuck_forever_waiting"
    assert any("stuck_forever_waiting" in frame for frame in task["stack"])


async def test_slow_query_shows_a_busy_executor_thread(pg_dsn: str) -> None:
    settings = make_settings(
        database_url=pg_dsn,
        observability={"admin_port": 0},
        queries={"sleep": {"sql": "SELECT pg_sleep(%(s)s)", "params": {"s": "float"}}},
        limits={"default_deadline_ms": 5000},
    )
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        admin = f"http://127.0.0.1:{gw.state.admin_port}"
        load = asyncio.create_task(post_aggregate(client, gw.url, {"s": {"query": "sleep", "params": {"s": 1.0}}}))
        deadline = time.monotonic() + 5
        while not gw.state.db.executor.stats().busy:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        _, threads = await get_json(client, f"{admin}/debug/threads")
        _, pools = await get_json(client, f"{admin}/debug/pools")
        await load
    busy = [t for t in threads["threads"] if t["busy"]]
    assert len(busy) == 1
    assert busy[0]["name"].startswith("db")
    assert any("_fetch" in frame for frame in busy[0]["stack"])
    assert pools["db"]["executor"]["busy"] == 1
    assert pools["db"]["running_threads"] == 1
    assert pools["db"]["pool"]["in_use"] == 1


def burn_cpu_on_the_loop(seconds: float) -> int:
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        n += sum(i * i for i in range(200))
    return n


@pytest.mark.parametrize("mode", ["cpu", "wall"])
async def test_profile_names_the_hot_function(mode: str) -> None:
    settings = make_settings(observability={"admin_port": 0})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        admin = f"http://127.0.0.1:{gw.state.admin_port}"
        assert sys.getprofile() is None
        profile = asyncio.create_task(get_json(client, f"{admin}/debug/profile?seconds=1&mode={mode}"))
        # The profiler samples this thread (the gateway runs on the test's loop) once it has started.
        deadline = time.monotonic() + 10
        while sys.getprofile() is None:
            assert time.monotonic() < deadline, "the profile did not start"
            await asyncio.sleep(0.01)
        # A second profile while one runs is refused.
        status, busy = await get_json(client, f"{admin}/debug/profile?seconds=1")
        for _ in range(5):
            burn_cpu_on_the_loop(0.1)
            await asyncio.sleep(0.01)
        status_ok, speedscope = await profile
    assert status == 409
    assert busy["type"] == "urn:gateway:problem:profiler-busy"
    assert status_ok == 200
    assert speedscope["$schema"].startswith("https://www.speedscope.app/")
    names = {frame["name"] for frame in speedscope["shared"]["frames"]}
    assert "burn_cpu_on_the_loop" in names


async def test_memory_and_bounds() -> None:
    settings = make_settings(observability={"admin_port": 0}, diagnostics={"tracemalloc_frames": 5})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        admin = f"http://127.0.0.1:{gw.state.admin_port}"
        status, memory = await get_json(client, f"{admin}/debug/memory?top=5")
        bad, _ = await get_json(client, f"{admin}/debug/profile?seconds=3600")
    assert status == 200
    assert memory["rss_bytes"] > 10_000_000
    assert memory["tracemalloc"]["enabled"] is True
    assert len(memory["tracemalloc"]["top"]) == 5
    assert bad == 422


async def test_sigusr1_dumps_threads_and_tasks(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="app.diagnostics")
    async with running_gateway(make_settings()):
        never = asyncio.Event()
        stuck = asyncio.create_task(stuck_forever_waiting(never), name="stuck-for-sigusr1")
        await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not any(getattr(r, "event", None) == "diagnostic_dump" for r in caplog.records):
            assert time.monotonic() < deadline, "no dump after SIGUSR1"
            await asyncio.sleep(0.01)
        never.set()
        await stuck
    (dump,) = [r for r in caplog.records if getattr(r, "event", None) == "diagnostic_dump"]
    text = dump.getMessage()
    assert "task stuck-for-sigusr1 stuck_forever_waiting" in text
    assert "thread MainThread" in text
    assert json.dumps(text)  # a plain string, loggable as JSON


async def test_the_public_listener_serves_debug_to_admin_keys_only() -> None:
    admin, user = new_key("ops", ["admin"]), new_key("app", ["aggregate", "transform", "metrics"])
    async with running_gateway(make_settings(auth=auth_with(admin, user))) as gw, aiohttp.ClientSession() as client:
        status, body = await get_json(client, f"{gw.url}/debug/pools")
        assert (status, body["type"]) == (401, "urn:gateway:problem:unauthorized")
        async with client.get(f"{gw.url}/debug/tasks", headers=user.bearer) as resp:
            assert resp.status == 403
        async with client.get(f"{gw.url}/debug/tasks", headers=admin.header) as resp:
            assert resp.status == 200
            tasks = await resp.json()
        async with client.get(f"{gw.url}/debug/pools", headers=admin.bearer) as resp:
            assert resp.status == 200
            pools = await resp.json()
        # An admin key is for operators, not for the API.
        async with client.post(f"{gw.url}/aggregate", json={"sources": {}}, headers=admin.bearer) as resp:
            assert resp.status == 403
        async with client.get(f"{gw.url}/openapi.json") as resp:
            schema = await resp.json()
    assert tasks["count"] == len(tasks["tasks"]) > 0
    assert pools["admission"]["limit"] == pools["admission"]["ceiling"] == 512
    assert not [path for path in schema["paths"] if path.startswith("/debug")]


async def test_with_an_admin_listener_debug_is_there_only() -> None:
    admin = new_key("ops", ["admin"])
    settings = make_settings(auth=auth_with(admin), observability={"admin_port": 0})
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        async with client.get(f"{gw.url}/debug/pools", headers=admin.bearer) as resp:
            assert resp.status == 404
        async with client.get(f"http://127.0.0.1:{gw.state.admin_port}/debug/pools") as resp:
            assert resp.status == 200


async def test_without_authentication_debug_stays_off_the_public_listener() -> None:
    async with (
        running_gateway(make_settings()) as gw,
        aiohttp.ClientSession() as client,
        client.get(f"{gw.url}/debug/pools") as resp,
    ):
        assert resp.status == 404
