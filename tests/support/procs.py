"""`gateway serve` as a real process for lifecycle tests, and the checks that follow its exit.

Every process started for a test carries a marker in its environment, which its children (forkserver, resource
tracker, workers) inherit: after the exit, ``leftover_processes()`` finds any of them still alive, wherever it was
reparented.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from tests.support.blocking import BLOCKED_LOOPS
from tests.support.net import free_port
from tests.support.session import SHM_PREFIX

MARKER = "GATEWAY_TEST_INSTANCE"
SHM = Path("/dev/shm")
# What a clean stop never writes. "leaked" and "resource_tracker" cover the standard library's warnings about
# semaphores and shared memory left behind.
BAD_STDERR = ("Traceback", "leaked", "resource_tracker", "Exception in ASGI application", "CancelledError")


@dataclass
class ServeProcess:
    proc: subprocess.Popen[bytes]
    port: int
    stderr_path: Path
    marker: str
    wrapped: bool = False  # started under a wrapper (unshare): the gateway is the wrapper's child
    exit_code: int | None = None
    exited_at: float | None = None
    _gateway: psutil.Process | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.stderr().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
        return events

    def event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in self.log_events() if e.get("event") == name), None)

    def event_time(self, name: str) -> float:
        entry = self.event(name)
        assert entry is not None, f"no {name!r} event in the log:\n{self.stderr()}"
        return dt.datetime.strptime(entry["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()

    def gateway(self) -> psutil.Process:
        """The gateway process itself (under a wrapper: the wrapper's child)."""
        if self._gateway is None:
            if not self.wrapped:
                self._gateway = psutil.Process(self.proc.pid)
            else:
                deadline = time.monotonic() + 10
                while not (kids := psutil.Process(self.proc.pid).children()):
                    assert time.monotonic() < deadline, "the wrapper started no child"
                    time.sleep(0.01)
                self._gateway = kids[0]
        return self._gateway

    def signal(self, sig: signal.Signals) -> None:
        self.gateway().send_signal(sig)

    def signal_group(self, sig: signal.Signals) -> None:
        """As Ctrl-C or `tini -g` do: the signal to every process of the gateway's process group."""
        os.killpg(os.getpgid(self.gateway().pid), sig)

    def descendants(self) -> list[psutil.Process]:
        return self.gateway().children(recursive=True)

    async def wait_ready(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        async with aiohttp.ClientSession() as session, asyncio.timeout(timeout):
            while True:
                assert self.proc.poll() is None, f"gateway exited with {self.proc.returncode}:\n{self.stderr()}"
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"{self.url}/readyz") as resp:
                        if resp.status == 200:
                            return
                await asyncio.sleep(0.05)

    async def wait_exit(self, timeout: float) -> int:  # noqa: ASYNC109
        """Wait for the exit (the event loop keeps running meanwhile); returns the exit code."""
        code = await asyncio.to_thread(self.proc.wait, timeout)
        self.exited_at = time.time()
        self.exit_code = code
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def poll_until(condition: Callable[[], bool], *, within: float = 15.0, every: float = 0.005) -> None:
    """Re-check ``condition`` (state outside this process: a log, /proc) until it holds; TimeoutError after
    ``within`` seconds."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(every)


def start_serve(
    config: Path,
    tmp_path: Path,
    *,
    env: dict[str, str] | None = None,
    new_session: bool = False,
    wrapper: list[str] | None = None,
) -> ServeProcess:
    """Start `gateway serve` on a free port without waiting for it (see ServeProcess.wait_ready)."""
    port = free_port()
    marker = uuid.uuid4().hex
    stderr_path = tmp_path / f"gateway-{port}.stderr"
    cmd = [sys.executable, "-m", "app", "serve", "--config", str(config), "--port", str(port)]
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [*(wrapper or []), *cmd],
            stdout=subprocess.DEVNULL,
            stderr=err,
            # Authentication off explicitly, as the tests of the drain do not test it (their env may switch it on).
            env={**os.environ, "GATEWAY_AUTH__ENABLED": "false", **(env or {}), MARKER: marker},
            start_new_session=new_session,
        )
    BLOCKED_LOOPS.watch_log(stderr_path, proc)
    return ServeProcess(proc, port, stderr_path, marker, wrapped=wrapper is not None)


def _carries(proc: psutil.Process, marker: str) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get(MARKER) == marker
    except psutil.Error:
        return False


def leftover_processes(marker: str, *, wait: float = 10.0) -> list[psutil.Process]:
    """Processes of that gateway still alive once ``wait`` has passed (helpers exit just after the gateway)."""
    deadline = time.monotonic() + wait
    while True:
        left = [p for p in psutil.process_iter() if _carries(p, marker)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def shm_segments() -> set[str]:
    """Shared memory segments of this session's gateways (their prefix, SHM_PREFIX, comes with the environment)."""
    return {p.name for p in SHM.glob(f"{SHM_PREFIX}*")} if SHM.is_dir() else set()


def new_shm_segments(before: set[str], *, wait: float = 2.0) -> set[str]:
    """Segments that appeared since ``before`` and are still there after ``wait`` (another process's short-lived
    segment would be gone by then)."""
    deadline = time.monotonic() + wait
    while True:
        new = shm_segments() - before
        if not new or time.monotonic() > deadline:
            return new
        time.sleep(0.05)


def assert_stopped_cleanly(gw: ServeProcess, shm_before: set[str]) -> None:
    """After the exit: no process of the gateway alive, no shared memory segment left, nothing bad on stderr."""
    assert gw.proc.poll() is not None, "the gateway is still running"
    left = leftover_processes(gw.marker)
    assert left == [], f"processes left behind: {[(p.pid, p.cmdline()) for p in left]}"
    assert new_shm_segments(shm_before) == set(), "shared memory segments left behind"
    stderr = gw.stderr()
    bad = [word for word in BAD_STDERR if word in stderr]
    assert bad == [], f"{bad} on stderr:\n{stderr}"
