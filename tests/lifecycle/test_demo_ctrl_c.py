"""Ctrl-C on `gateway demo`, pressed twice, as a terminal sends it: SIGINT to the whole foreground process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.net import free_port
from tests.support.procs import MARKER, leftover_processes


def wait_until(condition: Callable[[], bool], proc: subprocess.Popen[bytes], within: float) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert proc.poll() is None, f"the demo exited with {proc.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.timeout(120)
def test_demo_ctrl_c_twice_exits_0_without_a_traceback(tmp_path: Path) -> None:
    out_path = tmp_path / "demo.out"
    marker = uuid.uuid4().hex
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "demo", "--port", str(free_port()), "--failure-rate", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, MARKER: marker},
            start_new_session=True,  # the terminal's foreground group, in miniature
        )
    try:
        wait_until(lambda: "gateway demo is running" in out_path.read_text(), proc, within=60)
        os.killpg(proc.pid, signal.SIGINT)
        wait_until(lambda: "SIGINT: draining" in out_path.read_text(), proc, within=10)
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = out_path.read_text()
    assert code == 0, output
    assert "Traceback" not in output
    assert "leaked" not in output
    assert "outlived the lifespan" not in output, "the demo stops its own database and upstreams, in order"
    assert "second signal (SIGINT)" in output
    assert leftover_processes(marker) == [], "the demo left processes behind"
