from __future__ import annotations

from typing import Any

import aiohttp


async def post_aggregate(
    client: aiohttp.ClientSession, url: str, sources: dict[str, Any], **extra: Any
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    async with client.post(f"{url}/aggregate", json={"sources": sources, **extra}) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


def upstream_cfg(url: str, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "base_url": url,
        "max_concurrency": 8,
        "timeout_ms": 1000,
        "retry": {"attempts": 3, "backoff_initial_ms": 10, "backoff_max_ms": 50},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg
