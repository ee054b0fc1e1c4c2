"""Support for the fault suite: a config file written from a dict, a real `gateway serve` on it, and a client."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from tests.support.gateway import GatewayProcess, gateway_process


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as a TOML value")


def toml(data: dict[str, Any], prefix: str = "") -> str:
    """TOML for nested dicts of scalars and lists, with lists of dicts as arrays of tables."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict) or (isinstance(value, list) and value and all(isinstance(v, dict) for v in value)):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_scalar(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in tables:
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += f"\n[{name}]\n" + toml(value, f"{name}.")
        else:
            for item in value:
                out += f"\n[[{name}]]\n" + toml(item, f"{name}.")
    return out


BASE: dict[str, Any] = {
    "server": {"host": "127.0.0.1", "drain_delay_s": 0, "drain_timeout_s": 5, "log_format": "json"},
    "compute": {"enabled": False},
    "auth": {"enabled": False},
}


def config(**sections: Any) -> dict[str, Any]:
    merged = {k: dict(v) for k, v in BASE.items()}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


@contextlib.contextmanager
def serve(tmp_path: Path, data: dict[str, Any], *, check_log: bool = True, **kwargs: Any) -> Iterator[GatewayProcess]:
    """A real `gateway serve` on this config; afterwards (``check_log``) its log must hold no traceback."""
    path = tmp_path / f"gateway-{time.monotonic_ns()}.toml"
    path.write_text(toml(data))
    with gateway_process(path, tmp_path, auth=data.get("auth", {}).get("enabled", False), **kwargs) as gw:
        yield gw
    stderr = gw.stderr()
    assert not check_log or "Traceback" not in stderr, stderr[-4000:]


def rss_mib(gw: GatewayProcess) -> float:
    return psutil.Process(gw.proc.pid).memory_info().rss / 2**20


async def aggregate(
    client: aiohttp.ClientSession, gw: GatewayProcess, sources: dict[str, Any], deadline_ms: float = 2000
) -> tuple[int, Any, float]:
    """POST /aggregate; returns status, body and seconds taken."""
    started = time.perf_counter()
    async with client.post(f"{gw.url}/aggregate", json={"sources": sources, "deadline_ms": deadline_ms}) as resp:
        body = await resp.json(content_type=None)
        return resp.status, body, time.perf_counter() - started


async def healthz_ms(client: aiohttp.ClientSession, gw: GatewayProcess) -> float:
    started = time.perf_counter()
    async with client.get(f"{gw.url}/healthz") as resp:
        assert resp.status == 200
        await resp.read()
    return (time.perf_counter() - started) * 1000


def pool_workers(gw: GatewayProcess) -> list[psutil.Process]:
    """The CPU pool's worker processes: the children of the gateway's forkserver."""
    workers: list[psutil.Process] = []
    for child in psutil.Process(gw.proc.pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if "forkserver" in " ".join(child.cmdline()):
                workers += child.children()
    return workers
