"""A full /dev/shm must not kill the gateway: a real `gateway serve` in a private mount namespace whose /dev/shm
is a 2 MiB tmpfs. Writing into tmpfs pages that cannot be backed would raise SIGBUS; instead the space is reserved
first, and arrays that do not fit travel through the worker pipes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.compute.helpers import NPY, from_npy, npy_bytes, trig_log_reference
from tests.support.gateway import wait_http_ok
from tests.support.net import free_port

CONFIG = """
[server]
log_format = "text"
drain_delay_s = 0
[compute]
workers = 1
shm_threshold_bytes = 65536
load_plugins = false
"""
MOUNT = 'mount -t tmpfs -o size=2M tmpfs /dev/shm && exec "$@"'


def post_npy(url: str, array: np.ndarray) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=npy_bytes(array), headers={"Content-Type": NPY})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return resp.status, resp.read()


def test_a_full_dev_shm_falls_back_to_the_pipe_and_the_gateway_lives_on(tmp_path: Path) -> None:
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", MOUNT, "sh", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs here: {probe.stderr.decode().strip()}")
    config = tmp_path / "gateway.toml"
    config.write_text(CONFIG)
    port = free_port()
    stderr_path = tmp_path / "gateway.stderr"
    command = [sys.executable, "-m", "app", "serve", "--config", str(config), "--port", str(port)]
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen(
            ["unshare", "--mount", "sh", "-c", MOUNT, "sh", *command],
            stderr=stderr,
            env={**os.environ, "GATEWAY_AUTH__ENABLED": "false"},  # not what this test is about
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(f"{url}/readyz", proc=proc)
        # 1.5 MiB in, 1.5 MiB out: the input fits (reserved), the answer no longer does -> the worker's reservation
        # fails and the answer comes back through its pipe.
        fits = np.random.default_rng(1).standard_normal(3 << 16)
        status, body = post_npy(f"{url}/transform/trig_log", fits)
        assert status == 200
        np.testing.assert_array_equal(from_npy(body), trig_log_reference(fits))
        # 3 MiB: more than /dev/shm holds at all -> both directions through the pipe.
        too_big = np.random.default_rng(2).standard_normal(3 << 17)
        status, body = post_npy(f"{url}/transform/trig_log", too_big)
        assert status == 200
        np.testing.assert_array_equal(from_npy(body), trig_log_reference(too_big))
        wait_http_ok(f"{url}/healthz")
        assert proc.poll() is None
        # The gateway's own view of /dev/shm (its mount namespace): nothing left behind.
        assert os.listdir(f"/proc/{proc.pid}/root/dev/shm") == []
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    log = stderr_path.read_text()
    assert code == 0, log
    assert "could not hold a 1572992-byte answer" in log
    assert "cannot hold a 3145728-byte input" in log
    assert "Traceback" not in log
    assert "Bus error" not in log
