"""Start-up errors of real `gateway serve` and `gateway demo` processes: every problem is found before anything
starts, reported as `gateway check-config` reports it (one line each), with exit code 2 and no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

KEYS = '[{"name": "ci", "hash": "sha256:' + "ab" * 32 + '", "scopes": ["aggregate"]}]'


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OTEL_"))}
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
        env={**clean, **(env or {})},
    )


def assert_refused(res: subprocess.CompletedProcess[str], header: str, *lines: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.splitlines()[0] == header, res.stderr
    for line in lines:
        assert f"  {line}" in res.stderr.splitlines(), res.stderr
    assert '"level"' not in res.stderr, "a report, not a log line"


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_serve_with_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    res = run(["serve", "--config", str(missing)])
    assert_refused(res, f"{missing}: invalid", f"{missing}: cannot read: No such file or directory")
    assert run(["check-config", str(missing)]).stderr == res.stderr, "the same report as check-config"


def test_serve_with_an_empty_file_reports_authentication_without_keys(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    res = run(["serve", "--config", str(empty)])
    assert_refused(res, f"{empty}: invalid")
    assert "auth: authentication is on but no keys are configured" in res.stderr
    assert run(["check-config", str(empty)]).stderr == res.stderr, "the same report as check-config"


def test_serve_names_the_bad_environment_variable_not_the_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[auth]\nenabled = false\n")
    res = run(["serve", "--config", str(config)], env={"GATEWAY_SERVER__PORT": "eighty"})
    assert_refused(res, "environment: invalid")
    assert "GATEWAY_SERVER__PORT (server.port): Input should be a valid integer" in res.stderr
    assert str(config) not in res.stderr

    res = run(["serve", "--config", str(config)], env={"GATEWAY_AUTH__KEYS": "checkout"})
    assert_refused(res, "environment: invalid", "GATEWAY_AUTH__KEYS: not valid JSON (a list or table must be JSON)")

    # A file problem and a variable problem together: each line says where it comes from.
    config.write_text("[auth]\nenabled = false\n[limits]\nmax_sources = 0\n")
    res = run(["serve", "--config", str(config)], env={"GATEWAY_COMPUTE__WORKERS": "-1", "GATEWAY_AUTH__KEYS": KEYS})
    assert_refused(res, f"{config} and environment: invalid")
    assert "  limits.max_sources: Input should be greater than or equal to 1" in res.stderr
    assert "  GATEWAY_COMPUTE__WORKERS (compute.workers): Input should be greater than or equal to 1" in res.stderr


def test_serve_on_a_busy_port_says_which_option_changes_it(tmp_path: Path, busy_port: int) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[auth]\nenabled = false\n[compute]\nenabled = false\n")
    expected = (
        f"server.port: 127.0.0.1:{busy_port} is already in use: "
        "choose another port with --port, server.port or GATEWAY_SERVER__PORT"
    )
    assert_refused(run(["serve", "--config", str(config), "--port", str(busy_port)]), f"{config}: invalid", expected)
    # The same port from the environment, and for the admin listener.
    res = run(["serve", "--config", str(config)], env={"GATEWAY_SERVER__PORT": str(busy_port)})
    assert_refused(res, f"{config}: invalid", expected)
    config.write_text(f"[auth]\nenabled = false\n[observability]\nadmin_port = {busy_port}\n")
    res = run(["serve", "--config", str(config), "--port", "0"])
    assert_refused(
        res,
        f"{config}: invalid",
        f"observability.admin_port: 127.0.0.1:{busy_port} is already in use: "
        "choose another port with observability.admin_port or GATEWAY_OBSERVABILITY__ADMIN_PORT",
    )


def test_serve_refuses_a_bad_command_line_port(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[auth]\nenabled = false\n")
    res = run(["serve", "--config", str(config), "--port", "70000"])
    assert_refused(res, f"{config}: invalid", "--port: Input should be less than or equal to 65535")


def test_demo_on_a_busy_port_starts_nothing_and_suggests_port(busy_port: int, tmp_path: Path) -> None:
    # Nothing was started: no PostgreSQL, no upstreams, not even their temporary directory.
    res = run(["demo", "--port", str(busy_port)], env={"TMPDIR": str(tmp_path)})
    in_use = f"--port: 127.0.0.1:{busy_port} is already in use: choose another port with --port"
    assert_refused(res, "gateway demo: invalid", in_use)
    assert "starting" not in res.stdout
    assert list(tmp_path.iterdir()) == []
