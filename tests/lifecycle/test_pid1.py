"""The gateway as PID 1 of a container: in a new PID namespace (`unshare --pid --fork --mount-proc`), where the
kernel delivers a signal only if the process has a handler installed for it."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.balancer import Balancer
from tests.support.drill import AGGREGATE_SLOW, TRANSFORM, write_config
from tests.support.load import Load
from tests.support.procs import ServeProcess, assert_stopped_cleanly, poll_until, shm_segments, start_serve
from tests.support.upstream import Behavior, UpstreamServer

UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]


def _namespaces_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run([*UNSHARE, "true"], capture_output=True, check=False, timeout=10)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(
    not _namespaces_available(), reason="creating a PID namespace needs root (or user namespaces) and unshare"
)


def pid_in_namespace(gw: ServeProcess) -> int:
    """The gateway's PID as seen inside its own namespace (the last NSpid field)."""
    status = Path(f"/proc/{gw.gateway().pid}/status").read_text()
    nspid = next(line for line in status.splitlines() if line.startswith("NSpid:"))
    return int(nspid.split()[-1])


def catches(gw: ServeProcess, sig: signal.Signals) -> bool:
    status = Path(f"/proc/{gw.gateway().pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught & (1 << (sig - 1)))


@pytest.mark.timeout(60)
async def test_pid1_drains_like_any_process(tmp_path: Path, pg_dsn: str, upstream: UpstreamServer) -> None:
    delay, timeout = 1.0, 5.0
    upstream.set("/users/7", Behavior(latency=0.2, json={"id": 7}))
    config = write_config(tmp_path, upstream_url=upstream.url, delay=delay, timeout=timeout)
    shm_before = shm_segments()
    gw = start_serve(config, tmp_path, env={"GATEWAY_DATABASE_URL": pg_dsn}, wrapper=UNSHARE)
    try:
        await gw.wait_ready()
        assert pid_in_namespace(gw) == 1
        async with (
            Balancer(poll_interval=0.02) as probe,
            Load([AGGREGATE_SLOW, TRANSFORM], target=gw.url, concurrency=4) as load,
        ):
            probe.add(gw.url)
            await probe.wait_ready(gw.url)
            await load.wait_for(lambda: load.count("ok") >= 10)
            signalled = time.time()
            gw.signal(signal.SIGTERM)
            code = await gw.wait_exit(timeout=delay + timeout + 3)
            elapsed = time.time() - signalled
    finally:
        gw.kill()

    assert code == 0, gw.stderr()  # unshare exits with the code of its child, the gateway
    assert elapsed <= delay + timeout + 2
    not_ready = probe.first_change(gw.url, ready=False)
    assert not_ready is not None
    assert not_ready.at - signalled < 0.5
    closed = gw.event_time("listener_closed")
    assert closed - signalled >= delay - 0.05
    assert any(a.outcome == "ok" and a.started > not_ready.at and a.ended < closed for a in load.attempts)
    assert load.failures() == []
    assert_stopped_cleanly(gw, shm_before)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("moment", ["imports", "lifespan"])
async def test_pid1_signal_during_start_up_is_not_lost(
    tmp_path: Path, pg_dsn: str, upstream: UpstreamServer, moment: str
) -> None:
    config = write_config(tmp_path, upstream_url=upstream.url, delay=5, timeout=5)
    shm_before = shm_segments()
    gw = start_serve(config, tmp_path, env={"GATEWAY_DATABASE_URL": pg_dsn}, wrapper=UNSHARE)
    try:
        if moment == "imports":
            # As soon as a handler is installed, before the imports are done. As PID 1 without a handler the
            # signal would be dropped, and the process would run on until SIGKILL.
            await poll_until(lambda: catches(gw, signal.SIGTERM), every=0.002)
        else:
            # While the lifespan opens the CPU pool: start-up completes, then the gateway stops at once.
            await poll_until(lambda: any(e.get("resource") == "cpu_pool" for e in gw.log_events()), every=0.002)
        signalled = time.time()
        gw.signal(signal.SIGTERM)
        code = await gw.wait_exit(timeout=15)
        elapsed = time.time() - signalled
    finally:
        gw.kill()

    assert code == 0, gw.stderr()
    # Never ready, so nothing routes here and there is no drain delay: it stops as soon as it can.
    assert elapsed < 5, gw.stderr()
    events = [e.get("event") for e in gw.log_events()]
    if moment == "imports":
        assert "stopped_before_start" in events
        assert "opening" not in events
    else:
        assert events.count("opened") == events.count("closed")  # everything opened was closed again
        assert events.count("opened") >= 5
    assert_stopped_cleanly(gw, shm_before)
