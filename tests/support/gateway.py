"""Run the gateway for tests: in-process through its real lifespan and a real uvicorn server on a free port,
or as a real `gateway serve` subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.lifecycle.server import GatewayServer, build_server
from app.settings import Settings
from tests.support.blocking import BLOCKED_LOOPS, LIMIT_MS
from tests.support.net import free_port


def make_settings(**sections: Any) -> Settings:
    """Settings for tests: small pools, no CPU workers unless asked, fast deadlines; any section overridable."""
    data: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "drain_delay_s": 0, "drain_timeout_s": 5, "log_format": "text"},
        "database": {"executor_threads": 4, "queue_limit": 4, "min_connections": 1},
        "compute": {"enabled": False, "workers": 1},
        # A test fails if the loop is blocked this long (tests/support/blocking.py).
        "observability": {"blocking_threshold_ms": LIMIT_MS},
        # Off explicitly, as it must be: tests of authentication itself pass their own [auth].
        "auth": {"enabled": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return Settings(**data)


@dataclass
class RunningGateway:
    server: GatewayServer
    url: str

    @property
    def state(self) -> Any:
        return self.server.gateway.state


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings, *, server: GatewayServer | None = None) -> AsyncIterator[RunningGateway]:
    """The app behind a real uvicorn server in this event loop; stops it (lifespan shutdown included) on exit.
    ``server``: one built by the caller with build_server() (e.g. with its own tracer provider)."""
    ready = asyncio.Event()
    if server is None:
        server = build_server(settings)
    server.add_ready_callback(lambda _: ready.set())
    task = asyncio.create_task(server.serve(), name="gateway-under-test")
    done_first, _ = await asyncio.wait(
        {task, asyncio.create_task(ready.wait())}, timeout=30, return_when=asyncio.FIRST_COMPLETED
    )
    if task in done_first or not ready.is_set():
        server.should_exit = True
        await task
        raise RuntimeError("gateway failed to start (see the log)")
    try:
        with served_heap(settings.server.gc_thresholds):
            yield RunningGateway(server, f"http://127.0.0.1:{server.bound_port}")
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=30)


@contextlib.contextmanager
def served_heap(thresholds: tuple[int, ...]) -> Iterator[None]:
    """The collector as `gateway serve` sets it once ready (app/lifecycle/heap.py), for an in-process gateway: the
    heap built so far (here the whole test session's, which grows to hundreds of thousands of objects) out of the
    collector's sight, and the gateway's thresholds. Without it, a full collection of pytest's own objects (up to
    124 ms seen late in a run) lands on the loop the test measures. Restored on exit. Nothing is collected first: a
    full collection per test would cost the suite more than it saves."""
    previous = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(*thresholds)
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*previous)


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    url: str
    stderr_path: Path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout=timeout)


def wait_http_ok(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        with (
            contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
            urllib.request.urlopen(url, timeout=1) as resp,
        ):
            if resp.status == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout} s")


@contextlib.contextmanager
def gateway_process(
    config_path: Path,
    tmp_path: Path,
    *,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    auth: bool = False,
) -> Iterator[GatewayProcess]:
    """`gateway serve` as a real subprocess on a free port; waits for /readyz; SIGTERM (then SIGKILL) on exit.
    Authentication is switched off explicitly unless ``auth`` (then the config file's [auth] applies)."""
    port = free_port()
    env = {**({} if auth else {"GATEWAY_AUTH__ENABLED": "false"}), **(env or {})}
    stderr_path = tmp_path / f"gateway-{port}.stderr"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "serve", "--config", str(config_path), "--port", str(port), *(args or [])],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, **(env or {})},
        )
    gw = GatewayProcess(proc, f"http://127.0.0.1:{port}", stderr_path)
    BLOCKED_LOOPS.watch_log(stderr_path, proc)
    try:
        wait_http_ok(f"{gw.url}/readyz", proc=proc)
        yield gw
    except BaseException:
        if proc.poll() is not None:
            sys.stderr.write(gw.stderr())
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
