"""The variants under test: the gateway (uvloop and asyncio loops) and the four reference implementations, how
to start each, and the gateway's config (every feature on: limits, deadlines, retries, breakers, metrics, logs)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import Service, free_port


@dataclass(frozen=True)
class VariantSpec:
    key: str
    label: str
    module: str | None = None  # a reference: python -m <module>
    loop: str | None = None  # the gateway: [server] loop


VARIANTS: dict[str, VariantSpec] = {
    spec.key: spec
    for spec in (
        VariantSpec("gateway", "gateway (uvloop)", loop="uvloop"),
        VariantSpec("gateway-asyncio", "gateway (asyncio loop)", loop="asyncio"),
        VariantSpec("floor", "floor: raw aiohttp", module="bench.refs.floor"),
        VariantSpec("bare", "bare stack: uvicorn + ASGI + aiohttp", module="bench.refs.bare"),
        VariantSpec("fastapi", "typical FastAPI + httpx", module="bench.refs.fastapi_httpx"),
        VariantSpec("threaded", "threaded: requests + ThreadPoolExecutor", module="bench.refs.threaded"),
    )
}


@dataclass
class Variant:
    spec: VariantSpec
    service: Service
    url: str
    metrics_url: str | None = None  # the gateway's Prometheus endpoint
    admin_url: str | None = None  # the gateway's admin listener (/debug/profile)

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def is_gateway(self) -> bool:
        return self.spec.loop is not None


def toml(data: dict[str, Any], prefix: str = "") -> str:
    """A minimal TOML writer for nested tables of strings, numbers and booleans."""
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    lines = [f"[{prefix}]"] if prefix and scalars else []
    lines += [f"{k} = {json.dumps(v)}" for k, v in scalars.items()]  # JSON scalars are valid TOML scalars
    text = "\n".join(lines) + ("\n\n" if lines else "")
    for key, table in tables.items():
        text += toml(table, f"{prefix}.{key}" if prefix else key)
    return text


def gateway_config(upstreams: dict[str, str], *, loop: str, admin_port: int, **sections: Any) -> dict[str, Any]:
    """Every production feature on. Limits are sized for the load (a real deployment sizes them to what its
    upstreams take), so that they protect without being the bottleneck being measured."""
    config: dict[str, Any] = {
        "server": {
            "host": "127.0.0.1",
            "loop": loop,
            "log_format": "json",
            "log_level": "info",
            # No drain delay: scenarios stop their gateways between runs, and only the drain scenario measures it.
            "drain_delay_s": 0.0,
            "drain_timeout_s": 10.0,
        },
        # Loop lag sampled every 20 ms (default 100 ms): enough samples for a p99 over a run of a few seconds.
        "observability": {"access_log": True, "admin_port": admin_port, "loop_lag_interval_ms": 20},
        "http": {"max_connections": 1024, "max_in_flight": 1024},
        "compute": {"enabled": False},
        # Off, explicitly: the load generators send no API key, and the references have no authentication either.
        # A key check is one SHA-256 of a short token per request.
        "auth": {"enabled": False},
        "upstreams": {name: {"base_url": url, "max_concurrency": 512} for name, url in upstreams.items()},
    }
    for name, section in sections.items():
        config[name] = {**config.get(name, {}), **section}
    return config


def prune_to_schema(config: dict[str, Any]) -> list[str]:
    """Drop, in place, settings this build of the gateway does not have (an older or newer build than the harness
    was written against), so that one harness measures any build; returns the dotted names dropped."""
    from pydantic import BaseModel

    from app.settings import Settings

    dropped: list[str] = []

    def walk(data: dict[str, Any], model: type[BaseModel], prefix: str) -> None:
        for key in list(data):
            field = model.model_fields.get(key)
            if field is None:
                dropped.append(prefix + key)
                del data[key]
                continue
            sub = field.annotation
            if isinstance(data[key], dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
                walk(data[key], sub, f"{prefix}{key}.")

    walk(config, Settings, "")
    return dropped


def has_setting(dotted: str) -> bool:
    """Whether this build's Settings has ``dotted`` (e.g. ``limits.max_in_flight_requests``)."""
    probe: dict[str, Any] = {}
    node = probe
    *sections, last = dotted.split(".")
    for section in sections:
        node = node.setdefault(section, {})
    node[last] = None
    return not prune_to_schema(probe)


# For gateways whose config file cannot be fitted to their build (python -m bench.ab runs another revision):
# authentication off through the environment, which builds without it ignore.
GATEWAY_ENV = {"GATEWAY_AUTH__ENABLED": "false"}


def start_variant(
    spec: VariantSpec,
    upstreams: dict[str, str],
    *,
    cpus: str | None,
    workdir: Path,
    tag: str = "",
    env: dict[str, str] | None = None,
    **sections: Any,
) -> Variant:
    """Start one variant (not waiting for it: call ``service.wait_ready()``)."""
    port = free_port()
    name = f"{spec.key}{tag}"
    if spec.module is not None:
        argv = [sys.executable, "-m", spec.module, "--port", str(port), "--upstreams", json.dumps(upstreams)]
        service = Service(name, argv, cpus=cpus, health_url=f"http://127.0.0.1:{port}/healthz", log_dir=workdir)
        return Variant(spec, service.start(), f"http://127.0.0.1:{port}")
    assert spec.loop is not None
    admin = free_port()
    config = workdir / f"{name}.toml"
    data = gateway_config(upstreams, loop=spec.loop, admin_port=admin, **sections)
    dropped = prune_to_schema(data)
    if "server.loop" in dropped and spec.loop != "uvloop":
        raise RuntimeError("this build has no [server] loop setting: it cannot run on asyncio's own loop")
    config.write_text(toml(data))
    argv = [sys.executable, "-m", "app", "serve", "--config", str(config), "--port", str(port)]
    service = Service(
        name, argv, cpus=cpus, health_url=f"http://127.0.0.1:{port}/readyz", log_dir=workdir, env=env
    ).start()
    url = f"http://127.0.0.1:{port}"
    if "observability.admin_port" in dropped:
        return Variant(spec, service, url, f"{url}/metrics")
    admin_url = f"http://127.0.0.1:{admin}"
    return Variant(spec, service, url, f"{admin_url}/metrics", admin_url)


def aggregate_body(n: int, *, path: str = "/item") -> bytes:
    """An aggregate of ``n`` sources, each on its own upstream (u0, u1, ...), as a fan-out to n services."""
    sources = {f"s{i}": {"upstream": f"u{i}", "path": f"{path}/{i}"} for i in range(n)}
    return json.dumps({"sources": sources}).encode()


def upstream_names(n: int, url: str) -> dict[str, str]:
    return {f"u{i}": url for i in range(n)}
