"""`gateway serve` as a real subprocess."""

from __future__ import annotations

import json
import re
import signal
import time
import urllib.request
from pathlib import Path

import psutil

from tests.support.gateway import gateway_process
from tests.support.net import free_port


def test_serve_answers_and_stops_on_sigterm(tmp_path: Path, pg_dsn: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("""
[server]
drain_delay_s = 0
log_format = "json"
[compute]
workers = 1
[database]
executor_threads = 2
min_connections = 1
""")
    with gateway_process(config, tmp_path, env={"GATEWAY_DATABASE_URL": pg_dsn}) as gw:
        with urllib.request.urlopen(f"{gw.url}/readyz") as resp:
            assert json.load(resp) == {"status": "ready", "not_ready": []}
        with urllib.request.urlopen(f"{gw.url}/metrics") as resp:
            text = resp.read().decode()
            assert "gateway_event_loop_lag_seconds_bucket" in text
            assert "gateway_ready 1.0" in text
        children = psutil.Process(gw.proc.pid).children(recursive=True)
        assert children, "the CPU pool runs worker processes"
        gw.signal(signal.SIGTERM)
        code = gw.wait(timeout=30)
    assert code == 0, gw.stderr()
    assert psutil.wait_procs(children, timeout=5)[1] == []
    stderr = gw.stderr()
    assert "Traceback" not in stderr
    assert "leaked" not in stderr
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    assert any(entry.get("event") == "ready" for entry in lines)


def _with_admin_port(tmp_path: Path, server: str) -> tuple[Path, int]:
    """A config with these [server] lines, no worker processes, and the admin listener on a free port."""
    admin_port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"[server]\ndrain_delay_s = 0\n{server}\n[compute]\nenabled = false\n"
        f"[observability]\nadmin_port = {admin_port}\n"
    )
    return config, admin_port


def test_serve_freezes_its_start_up_heap_and_sets_the_collector_thresholds(tmp_path: Path) -> None:
    config, admin_port = _with_admin_port(tmp_path, "gc_thresholds = [3000, 15, 12]")
    with gateway_process(config, tmp_path) as gw:
        deadline = time.monotonic() + 10
        while True:  # set once the server is ready, which /readyz may report a moment before
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/debug/memory") as resp:
                collector = json.load(resp)["gc"]
            if collector["thresholds"] == [3000, 15, 12] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert gw.proc.poll() is None
    assert collector["thresholds"] == [3000, 15, 12]
    assert collector["frozen_objects"] > 10_000, "the start-up heap is out of the collector's sight"
    assert len(collector["generations"]) == 3


def test_serve_collects_on_its_clock(tmp_path: Path) -> None:
    config, admin_port = _with_admin_port(tmp_path, "gc_interval_s = 0.05")
    with gateway_process(config, tmp_path) as gw:
        deadline = time.monotonic() + 10
        while True:  # the clock's first collections, once ready
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics") as resp:
                text = resp.read().decode()
            count = re.search(r'^gateway_gc_pause_seconds_count\{generation="0"\} (\S+)$', text, re.MULTILINE)
            if (count is not None and float(count.group(1)) >= 2) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/debug/memory") as resp:
            collector = json.load(resp)["gc"]
        assert gw.proc.poll() is None
    assert count is not None, "the pause histogram is exported"
    assert float(count.group(1)) >= 2, "young collections on the clock"
    assert collector["count_trigger"] is False, "allocations no longer set off collections"
    assert collector["frozen_objects"] > 10_000


def test_serve_refuses_an_invalid_config(tmp_path: Path) -> None:
    import subprocess
    import sys

    config = tmp_path / "bad.toml"
    config.write_text("[upstreams.x]\nbase_url = 'nope'\n")
    res = subprocess.run(
        [sys.executable, "-m", "app", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 2
    assert "upstreams.x.base_url" in res.stderr
    assert "Traceback" not in res.stderr
