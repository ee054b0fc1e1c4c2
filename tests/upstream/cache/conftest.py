"""Helpers for the cache's tests against a real gateway: one source per request, its result read back."""

from __future__ import annotations

from typing import Any

import aiohttp
from prometheus_client import generate_latest

from tests.aggregate.conftest import upstream_cfg
from tests.security.conftest import metric
from tests.support.gateway import RunningGateway


def cached_cfg(url: str, cache: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """An upstream with its cache on (memory), no retries (each call is one request at the upstream)."""
    return upstream_cfg(url, retry={"attempts": 1}, cache={"enabled": True, **(cache or {})}, **overrides)


async def source(
    client: aiohttp.ClientSession,
    gw: RunningGateway,
    path: str = "/item",
    *,
    upstream: str = "u",
    headers: dict[str, str] | None = None,
    deadline_ms: float | None = None,
    request_headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """POST /aggregate with one source ``s``; its result."""
    spec: dict[str, Any] = {"upstream": upstream, "path": path}
    if headers:
        spec["headers"] = headers
    body: dict[str, Any] = {"sources": {"s": spec}}
    if deadline_ms is not None:
        body["deadline_ms"] = deadline_ms
    async with client.post(f"{gw.url}/aggregate", json=body, headers=request_headers) as resp:
        answer = await resp.json(content_type=None)
        assert resp.status == 200, answer
    result: dict[str, Any] = answer["results"]["s"]
    return result


def cache_metric(gw: RunningGateway, name: str, **labels: str) -> float:
    return metric(generate_latest(gw.state.metrics.registry).decode(), name, **labels)
