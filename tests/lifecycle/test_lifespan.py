from __future__ import annotations

import logging
import socket

import aiohttp
import psutil
import pytest

from app.errors import StartupError
from app.lifecycle.lifespan import expected_resources
from app.lifecycle.readiness import Readiness
from app.main import create_app
from tests.support.gateway import make_settings, running_gateway


def lifecycle_events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [
        (r.event, r.resource)
        for r in caplog.records  # type: ignore[attr-defined]
        if r.name == "app.lifecycle" and getattr(r, "resource", None)
    ]


async def test_resources_open_in_order_and_close_in_reverse(pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.lifecycle")
    settings = make_settings(database_url=pg_dsn, compute={"enabled": True, "workers": 1})
    async with running_gateway(settings) as gw:
        state = gw.state
        assert state.readiness.ready
        workers = [psutil.Process(pid) for pid in state.cpu.worker_pids]
        assert workers
        assert all(p.is_running() for p in workers)
        async with aiohttp.ClientSession() as client, client.get(f"{gw.url}/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ready"
    events = lifecycle_events(caplog)
    opened = [name for event, name in events if event == "opened"]
    closed = [name for event, name in events if event == "closed"]
    assert opened == [
        "metrics",
        "tracing",
        "guard",
        "http",
        "upstreams",
        "database",
        "cpu_pool",
        "diagnostics",
        "loop_lag",
        "collector",
        "blocking_detector",
    ]
    assert closed == list(reversed(opened))
    assert not state.readiness.ready
    assert state.readiness.report()["status"] == "stopping"
    assert state.http._session.closed
    gone = psutil.wait_procs(workers, timeout=10)[1]
    assert gone == [], "process-pool workers outlived the lifespan"


async def test_failed_start_closes_what_was_opened(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.lifecycle")
    # A port with nothing listening: the database cannot be reached and startup_check refuses to start.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    settings = make_settings(
        database_url=f"postgresql://postgres@127.0.0.1:{dead_port}/x", compute={"enabled": True, "workers": 1}
    )
    app = create_app(settings)
    with pytest.raises(StartupError, match="database unreachable"):
        async with app.router.lifespan_context(app):
            pytest.fail("the lifespan must not start")
    events = lifecycle_events(caplog)
    assert [n for e, n in events if e == "opened"] == ["metrics", "tracing", "guard", "http", "upstreams"]
    # database failed in start(): its aclose() still ran, then the opened ones in reverse; the pool never started
    assert [n for e, n in events if e == "closed"] == ["database", "upstreams", "http", "guard", "tracing", "metrics"]
    state = app.state.gateway
    assert state.http._session.closed
    assert state.cpu is None
    assert state.readiness.missing() == expected_resources(settings)


async def test_database_optional_at_startup_when_configured(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    settings = make_settings(
        database_url=f"postgresql://postgres@127.0.0.1:{dead_port}/x", database={"startup_check": False}
    )
    async with running_gateway(settings) as gw:
        assert gw.state.readiness.ready
    assert any("database unreachable at start-up" in r.getMessage() for r in caplog.records)


def test_readiness_reports_what_is_missing() -> None:
    readiness = Readiness(expected=["http", "database"])
    assert not readiness.ready
    assert readiness.report() == {"status": "starting", "not_ready": ["http", "database"]}
    readiness.mark_started("http")
    readiness.mark_started("database")
    assert readiness.ready
    assert readiness.report()["status"] == "ready"
    readiness.draining = True
    assert not readiness.ready
    assert readiness.report()["status"] == "draining"
