"""Signals sent to the whole process group (Ctrl-C, ``tini -g``) reach the workers too: they ignore them, so a
real `gateway serve` drains the job in flight and only then stops its workers itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.compute.helpers import primes_upto
from tests.support.gateway import wait_http_ok
from tests.support.net import free_port

CONFIG = """
[server]
log_format = "text"
drain_delay_s = 0
drain_timeout_s = 30
[compute]
workers = 2
load_plugins = false
"""
N = 20_000_000  # a second or two of pure-Python sieving


def wait_for_cpu_work(processes: list[psutil.Process], timeout: float = 10.0) -> None:
    """Until one of ``processes`` has burnt a visible amount of CPU: the job is running."""
    baseline = {p.pid: p.cpu_times().user for p in processes}
    deadline = time.monotonic() + timeout
    while not any(p.cpu_times().user - baseline[p.pid] > 0.1 for p in processes if p.is_running()):
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_process_group_lets_the_running_job_finish(tmp_path: Path, sig: signal.Signals) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG)
    port = free_port()
    stderr_path = tmp_path / "gateway.stderr"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--config", str(config), "--port", str(port)],
            stderr=stderr,
            start_new_session=True,  # its own process group, as under tini; the signal must not reach pytest
            env={**os.environ, "GATEWAY_AUTH__ENABLED": "false"},  # not what this test is about
        )
    url = f"http://127.0.0.1:{port}"
    reply: dict[str, object] = {}

    def request() -> None:
        body = json.dumps({"data": [N]}).encode()
        headers = {"Content-Type": "application/json"}
        req = urllib.request.Request(f"{url}/transform/prime_count", data=body, headers=headers)
        with urllib.request.urlopen(req, timeout=60) as resp:
            reply["status"] = resp.status
            reply["body"] = json.load(resp)

    try:
        wait_http_ok(f"{url}/readyz", proc=proc)
        descendants = psutil.Process(proc.pid).children(recursive=True)  # workers, fork server, resource tracker
        client = threading.Thread(target=request)
        client.start()
        wait_for_cpu_work(descendants)
        os.killpg(proc.pid, sig)  # the whole group: gateway, fork server, workers, tracker
        client.join(timeout=60)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = stderr_path.read_text()
    assert reply.get("status") == 200, log
    assert reply["body"] == {"result": [primes_upto(N)]}
    assert code == 0, log
    assert psutil.wait_procs(descendants, timeout=10)[1] == [], "processes outlived the gateway"
    assert "Traceback" not in log
