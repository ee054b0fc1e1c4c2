"""Draining on SIGTERM/SIGINT: a real `gateway serve` process, real signals, real load."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import signal
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
import psycopg2
import pytest

from tests.support.balancer import Balancer
from tests.support.drill import AGGREGATE_SLOW, MIX, TRANSFORM, write_config
from tests.support.load import Load
from tests.support.procs import (
    ServeProcess,
    assert_stopped_cleanly,
    leftover_processes,
    poll_until,
    shm_segments,
    start_serve,
)
from tests.support.upstream import Behavior, UpstreamServer

BOUND_SLACK_S = 2.0  # the requirement: exit within drain_delay + drain_timeout + 2 s of the first signal


async def scrape(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


async def wait_for_event(gw: ServeProcess, name: str) -> None:
    await poll_until(lambda: gw.event(name) is not None, every=0.02)


@pytest.mark.timeout(60)
async def test_sigterm_under_load_drops_nothing(tmp_path: Path, pg_dsn: str, upstream: UpstreamServer) -> None:
    delay, timeout = 1.5, 5.0
    upstream.set("/users/7", Behavior(latency=0.2, json={"id": 7}))
    config = write_config(tmp_path, upstream_url=upstream.url, delay=delay, timeout=timeout)
    shm_before = shm_segments()
    gw = start_serve(config, tmp_path, env={"GATEWAY_DATABASE_URL": pg_dsn})
    try:
        await gw.wait_ready()
        async with Balancer(poll_interval=0.02) as probe, Load(MIX, target=gw.url, concurrency=8) as load:
            probe.add(gw.url)
            await probe.wait_ready(gw.url)
            await load.wait_for(lambda: all(load.count("ok", c.label) >= 5 for c in MIX))

            signalled = time.time()
            gw.signal(signal.SIGTERM)
            await probe.wait_not_ready(gw.url, timeout=2)
            assert await scrape(gw.url, "gateway_draining") == 1.0
            code = await gw.wait_exit(timeout=delay + timeout + BOUND_SLACK_S + 1)
            elapsed = time.time() - signalled
            # Keep the load on the closed port a moment: every attempt after the exit must be refused.
            exited = time.time()
            await load.wait_for(lambda: any(a.outcome == "refused" and a.started > exited for a in load.attempts))
    finally:
        gw.kill()

    assert code == 0, gw.stderr()
    assert elapsed <= delay + timeout + BOUND_SLACK_S
    assert elapsed < delay + timeout - 1, "in-flight requests take 200 ms: the drain must not wait out its timeout"

    closed = gw.event_time("listener_closed")
    not_ready = probe.first_change(gw.url, ready=False)
    assert not_ready is not None
    assert not_ready.status == 503
    assert not_ready.report == "draining"
    # /readyz turned 503 at once, and traffic still routed here kept succeeding for the whole drain_delay.
    assert not_ready.at - signalled < 0.5
    assert closed - signalled >= delay - 0.05
    served_while_draining = [
        a for a in load.attempts if a.outcome == "ok" and a.started > not_ready.at and a.ended < closed
    ]
    assert sum(a.label == AGGREGATE_SLOW.label for a in served_while_draining) >= 5
    assert all(a.connection_close for a in served_while_draining), "draining answers must close their connection"

    # Nothing that was sent failed: every request got a complete, successful answer; only connections
    # attempted after the listener closed were refused.
    assert load.failures() == []
    refused = [a for a in load.attempts if a.outcome == "refused"]
    assert refused
    # (An attempt is timed before the client's loop gets to send its SYN: allow for that lag.)
    assert min(a.started for a in refused) >= closed - 0.25, "a connection was refused before the listener closed"
    late = [a for a in load.attempts if a.started > closed + 0.05]
    assert late
    assert all(a.outcome == "refused" for a in late)

    finished = gw.event("drain_finished")
    assert finished is not None
    assert finished["cancelled_requests"] == 0
    assert finished["exit_code"] == 0
    assert_stopped_cleanly(gw, shm_before)


@pytest.mark.timeout(60)
async def test_request_past_drain_timeout_is_cancelled(tmp_path: Path, pg_dsn: str, upstream: UpstreamServer) -> None:
    timeout = 1.0
    upstream.set("/hang", Behavior(mode="hang"))
    config = write_config(tmp_path, upstream_url=upstream.url, delay=0, timeout=timeout)
    shm_before = shm_segments()
    gw = start_serve(config, tmp_path, env={"GATEWAY_DATABASE_URL": pg_dsn})
    slow_upstream = {"sources": {"never": {"upstream": "slow", "path": "/hang"}}, "deadline_ms": 20000}
    # A value of its own, so that only this test's query matches in pg_stat_activity.
    nap = 15 + secrets.randbelow(10**6) / 10**6
    slow_query = {"sources": {"nap": {"query": "sleep", "params": {"seconds": nap}}}, "deadline_ms": 20000}
    try:
        await gw.wait_ready()
        async with aiohttp.ClientSession() as client:

            async def post(body: object) -> tuple[int, dict[str, str], dict[str, object]]:
                async with client.post(f"{gw.url}/aggregate", json=body) as resp:
                    return resp.status, dict(resp.headers), await resp.json(content_type=None)

            requests = [asyncio.create_task(post(slow_upstream)), asyncio.create_task(post(slow_query))]
            await upstream.await_requests(1)
            await asyncio.to_thread(wait_for_query, pg_dsn, f"pg_sleep({nap})")
            signalled = time.time()
            gw.signal(signal.SIGTERM)
            answers = await asyncio.gather(*requests)
            answered = time.time() - signalled
            code = await gw.wait_exit(timeout=timeout + BOUND_SLACK_S + 1)
            elapsed = time.time() - signalled
    finally:
        gw.kill()

    assert code == 4, gw.stderr()
    assert timeout - 0.05 <= answered < timeout + 0.5
    assert elapsed <= timeout + BOUND_SLACK_S
    for status, headers, body in answers:
        assert status == 503
        assert headers["Content-Type"] == "application/problem+json"
        assert headers["Connection"] == "close"
        assert headers["Retry-After"] == "0"
        assert body["type"] == "urn:gateway:problem:shutting-down"
        assert "shutting down" in str(body["detail"])
    timed_out = gw.event("drain_timeout")
    assert timed_out is not None
    assert timed_out["in_flight"] == 2
    finished = gw.event("drain_finished")
    assert finished is not None
    assert finished["cancelled_requests"] == 2
    assert finished["cancelled_queries"] == 1  # the database query was cancelled on the server, not awaited
    assert finished["exit_code"] == 4
    assert running_queries(pg_dsn, f"pg_sleep({nap})") == 0
    assert_stopped_cleanly(gw, shm_before)


@pytest.mark.timeout(60)
async def test_second_signal_cuts_the_drain_short(tmp_path: Path, pg_dsn: str, upstream: UpstreamServer) -> None:
    upstream.set("/hang", Behavior(mode="hang"))
    config = write_config(tmp_path, upstream_url=upstream.url, delay=10, timeout=10, workers=2)
    shm_before = shm_segments()
    gw = start_serve(config, tmp_path, env={"GATEWAY_DATABASE_URL": pg_dsn})
    try:
        await gw.wait_ready()
        workers = gw.descendants()
        assert len(workers) >= 3  # forkserver, two workers (and the resource tracker)
        async with aiohttp.ClientSession() as client:

            async def hang() -> tuple[int, dict[str, object]]:
                body = {"sources": {"never": {"upstream": "slow", "path": "/hang"}}, "deadline_ms": 25000}
                async with client.post(f"{gw.url}/aggregate", json=body) as resp:
                    return resp.status, await resp.json(content_type=None)

            request = asyncio.create_task(hang())
            await upstream.await_requests(1)
            gw.signal(signal.SIGTERM)
            await wait_for_event(gw, "drain_started")
            cut = time.time()
            gw.signal(signal.SIGINT)
            status, body = await request
            code = await gw.wait_exit(timeout=5)
            elapsed = time.time() - cut
    finally:
        gw.kill()

    assert elapsed < 2.0, "a second signal must end the drain promptly"
    assert code == 4, gw.stderr()  # a request was cancelled
    assert status == 503
    assert body["type"] == "urn:gateway:problem:shutting-down"
    assert gw.event("drain_cut_short") is not None
    finished = gw.event("drain_finished")
    assert finished is not None
    assert finished["signals"] == ["SIGTERM", "SIGINT"]
    # The lifespan still ran its whole shutdown: every resource closed, in reverse order.
    opened = [e["resource"] for e in gw.log_events() if e.get("event") == "opened"]
    closed = [e["resource"] for e in gw.log_events() if e.get("event") == "closed"]
    assert "cpu_pool" in opened
    assert "database" in opened
    assert closed == list(reversed(opened))
    assert_stopped_cleanly(gw, shm_before)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["tini-g", "ctrl-c"])
async def test_signal_to_the_process_group_spares_cpu_jobs(
    tmp_path: Path, pg_dsn: str, upstream: UpstreamServer, sig: signal.Signals
) -> None:
    delay = 1.0
    config = write_config(tmp_path, upstream_url=upstream.url, delay=delay, timeout=5, workers=1)
    shm_before = shm_segments()
    # Its own session, as under a terminal or tini: the group signal reaches the gateway and all its children.
    gw = start_serve(config, tmp_path, env={"GATEWAY_DATABASE_URL": pg_dsn}, new_session=True)
    try:
        await gw.wait_ready()
        children = {p.pid for p in gw.descendants()}
        async with Load([TRANSFORM], target=gw.url, concurrency=4) as load:
            await load.wait_for(lambda: load.count("ok") >= 20)
            gw.signal_group(sig)
            await wait_for_event(gw, "listener_closed")
            # A whole drain_delay later, the forkserver and the worker are the same processes, alive: none died of
            # the signal, none had to be replaced, and the jobs kept completing all along.
            survivors = {p.pid for p in gw.descendants()}
            code = await gw.wait_exit(timeout=10)
    finally:
        gw.kill()

    assert code == 0, gw.stderr()
    assert survivors == children
    assert load.failures() == []
    closed = gw.event_time("listener_closed")
    assert sum(a.outcome == "ok" and a.ended > closed - delay / 2 for a in load.attempts) >= 5
    assert_stopped_cleanly(gw, shm_before)


def wait_for_query(dsn: str, needle: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while running_queries(dsn, needle) == 0:
        assert time.monotonic() < deadline, f"no running query like {needle!r}"
        time.sleep(0.02)


def running_queries(dsn: str, needle: str) -> int:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'gateway' AND state = 'active' "
            "AND query LIKE %s",
            (f"%{needle}%",),
        )
        row = cur.fetchone()
    conn.close()
    assert row is not None
    return int(row[0])


@pytest.mark.timeout(60)
async def test_a_wedged_shutdown_still_ends_within_the_bound(
    tmp_path: Path, pg_dsn: str, upstream: UpstreamServer
) -> None:
    timeout = 0.5
    config = write_config(tmp_path, upstream_url=upstream.url, delay=0, timeout=timeout, workers=1)
    sems_before = sem_files()
    # The watchdog ends the gateway with os._exit, so multiprocessing cannot remove its pymp-* directory (the
    # forkserver's socket): the gateway gets a TMPDIR of its own, removed after it as a supervisor wipes a killed
    # container's /tmp. (Short, in /tmp: the socket's path is limited to 107 bytes.)
    own_tmp = Path(tempfile.mkdtemp(prefix="gwtest-wedged-"))
    gw = start_serve(config, tmp_path, env={"GATEWAY_DATABASE_URL": pg_dsn, "TMPDIR": str(own_tmp)})
    # A value of its own, so that only this test's query matches in pg_stat_activity.
    nap = 20 + secrets.randbelow(10**6) / 10**6
    wedged: list[psutil.Process] = []
    try:
        await gw.wait_ready()
        async with aiohttp.ClientSession() as client:
            body = {"sources": {"nap": {"query": "sleep", "params": {"seconds": nap}}}, "deadline_ms": 30000}
            job = asyncio.create_task(client.post(f"{gw.url}/aggregate", json=body))
            await asyncio.to_thread(wait_for_query, pg_dsn, f"pg_sleep({nap})")
            # A wedged database backend (stopped, as a frozen host leaves it): it cannot act on the cancel, so the
            # DB executor's close waits for its thread for ever, and only the watchdog ends the process.
            backend = psutil.Process(backend_pid(pg_dsn, f"pg_sleep({nap})"))
            backend.suspend()
            wedged.append(backend)
            signalled = time.time()
            gw.signal(signal.SIGTERM)
            code = await gw.wait_exit(timeout=timeout + BOUND_SLACK_S + 2)
            elapsed = time.time() - signalled
            status = (await job).status
    finally:
        gw.kill()
        for proc in wedged:  # never leave a stopped backend behind, whatever happened
            with contextlib.suppress(psutil.Error):
                proc.resume()
                proc.terminate()
        shutil.rmtree(own_tmp)

    assert code == 5, gw.stderr()
    assert elapsed <= timeout + BOUND_SLACK_S
    assert status == 503
    assert gw.event("drain_overran") is not None
    assert leftover_processes(gw.marker) == []
    # The resource tracker outlived the gateway and unlinked the semaphores it could no longer unlink itself.
    assert new_sems(sems_before) == set()


def backend_pid(dsn: str, needle: str) -> int:
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'gateway' AND query LIKE %s", (f"%{needle}%",)
        )
        row = cur.fetchone()
    conn.close()
    assert row is not None
    return int(row[0])


def sem_files() -> set[str]:
    """POSIX named semaphores (multiprocessing's locks) in /dev/shm."""
    return {p.name for p in Path("/dev/shm").glob("sem.*")}


def new_sems(before: set[str], wait: float = 5.0) -> set[str]:
    deadline = time.monotonic() + wait
    while (new := sem_files() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    return new
