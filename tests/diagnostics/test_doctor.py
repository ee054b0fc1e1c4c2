"""`gateway doctor` as a real subprocess against this host."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.sizing import effective_cpu_count
from tests.support.upstream import UpstreamServer


def doctor(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", "doctor", "--config", str(config), *args],
        capture_output=True, text=True, timeout=60, check=False, env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.fixture
def small_shm(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "shm"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_healthy_host_passes(tmp_path: Path, pg_dsn: str, upstream: UpstreamServer) -> None:
    config = tmp_path / "g.toml"
    config.write_text(f"""
[compute]
workers = 1
[database]
executor_threads = 4
[upstreams.users]
base_url = "{upstream.url}"
""")
    res = doctor(config, "--replicas", "3", env={"GATEWAY_DATABASE_URL": pg_dsn})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK   database: reachable; 12 of" in res.stdout
    assert "OK   upstream users:" in res.stdout
    assert res.stdout.strip().endswith("verdict: ready to deploy")


def test_flags_oversized_pool_small_shm_and_dead_things(tmp_path: Path, small_shm: Path) -> None:
    with UpstreamServer() as gone:
        dead_url = gone.url
    config = tmp_path / "g.toml"
    config.write_text(f"""
database_url = "postgresql://postgres@127.0.0.1:1/none"
[compute]
workers = {effective_cpu_count() + 1}
[upstreams.users]
base_url = "{dead_url}"
""")
    res = doctor(config, "--shm-path", str(small_shm))
    assert res.returncode == 1
    lines = res.stdout.splitlines()
    assert any(line.startswith("FAIL cpu: compute.workers=") for line in lines), res.stdout
    assert any(line.startswith("FAIL shm:") and "4 MiB free" in line for line in lines), res.stdout
    assert any(line.startswith("FAIL database: unreachable") for line in lines), res.stdout
    assert any(line.startswith("FAIL upstream users:") for line in lines), res.stdout
    assert lines[-1] == "verdict: problems found"


def test_too_many_replicas_for_max_connections(tmp_path: Path, pg_dsn: str) -> None:
    config = tmp_path / "g.toml"
    config.write_text("[compute]\nenabled = false\n[database]\nexecutor_threads = 32\n")
    res = doctor(config, "--replicas", "1000", env={"GATEWAY_DATABASE_URL": pg_dsn})
    assert res.returncode == 1
    assert "FAIL database: 1000 replicas x pool 32 = 32000 connections" in res.stdout
