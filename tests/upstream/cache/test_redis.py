"""The shared cache against a real Redis: two real `gateway serve` processes share one entry; a Redis that is down
or hangs costs a bounded moment, is counted, and never fails a source."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import requests

from tests.security.conftest import redis_prefix, redis_url  # noqa: F401  (fixtures)
from tests.support.gateway import gateway_process, make_settings, running_gateway
from tests.support.upstream import Behavior, UpstreamServer
from tests.upstream.cache.conftest import cache_metric, cached_cfg, source


def post(url: str, path: str = "/item") -> dict[str, Any]:
    resp = requests.post(f"{url}/aggregate", json={"sources": {"s": {"upstream": "u", "path": path}}}, timeout=10)
    assert resp.status_code == 200, resp.text
    result: dict[str, Any] = resp.json()["results"]["s"]
    return result


def test_two_gateway_processes_share_an_entry(
    upstream: UpstreamServer,
    redis_url: str,  # noqa: F811
    redis_prefix: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    upstream.set("/item", Behavior(json={"v": 1}, headers={"Cache-Control": "max-age=60"}))
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[server]
drain_delay_s = 0

[compute]
enabled = false

[cache]
redis_url = "{redis_url}"
redis_prefix = "{redis_prefix}"

[upstreams.u]
base_url = "{upstream.url}"

[upstreams.u.cache]
enabled = true
backend = "redis"
stale_if_error_s = 30
"""
    )
    with gateway_process(config, tmp_path) as one, gateway_process(config, tmp_path) as two:
        first = post(one.url)
        second = post(two.url)
        third = post(one.url)
    assert [r["cache"] for r in (first, second, third)] == ["miss", "hit", "hit"]
    assert first["data"] == second["data"] == third["data"] == {"v": 1}
    assert upstream.count("/item") == 1
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=redis_prefix + "*"))
        assert len(keys) == 1
        assert keys[0].startswith(f"{redis_prefix}u:".encode())
        # Kept as long as it is of use: 60 s fresh and 30 s stale, no longer.
        assert 85_000 < client.pttl(keys[0]) <= 90_000
    finally:
        client.close()


@pytest.fixture
def silent_redis() -> Iterator[int]:
    """A TCP server that accepts connections and never answers: a Redis that hangs."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    listener.close()
    for conn in held:
        conn.close()


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("redis_state", ["down", "hanging"])
async def test_a_redis_that_is_down_or_hangs_is_a_bounded_miss(
    upstream: UpstreamServer, silent_redis: int, redis_state: str
) -> None:
    port = dead_port() if redis_state == "down" else silent_redis
    upstream.set("/item", Behavior(json={"v": 3}, headers={"Cache-Control": "max-age=60"}))
    settings = make_settings(
        cache={"redis_url": f"redis://127.0.0.1:{port}/0", "redis_timeout_ms": 50},
        upstreams={"u": cached_cfg(upstream.url, {"backend": "redis"})},
    )
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        for _ in range(3):
            started = time.monotonic()
            result = await source(client, gw)
            took = time.monotonic() - started
            assert (result["ok"], result["data"], result["cache"]) == (True, {"v": 3}, "miss")
            # At most one lookup's timeout (then Redis is left alone for a second), plus the call itself.
            assert took < 0.5, f"{took * 1000:.0f} ms"
        assert upstream.count("/item") == 3
        assert cache_metric(gw, "gateway_upstream_cache_backend_errors_total", upstream="u") >= 3


async def test_an_expired_entry_in_redis_stands_in_for_a_failing_upstream(
    upstream: UpstreamServer,
    redis_url: str,  # noqa: F811
    redis_prefix: str,  # noqa: F811
) -> None:
    upstream.set("/item", Behavior(json={"v": "shared"}))
    cache = {"backend": "redis", "default_ttl_s": 0.2, "stale_if_error_s": 60}
    settings = make_settings(
        cache={"redis_url": redis_url, "redis_prefix": redis_prefix},
        upstreams={"u": cached_cfg(upstream.url, cache)},
    )
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        assert (await source(client, gw))["cache"] == "miss"
        upstream.set("/item", Behavior(status=502))
        deadline = time.monotonic() + 5
        while (result := await source(client, gw))["cache"] == "hit":
            assert time.monotonic() < deadline, "the entry never expired"
        assert (result["ok"], result["cache"], result["data"]) == (True, "stale", {"v": "shared"})
        assert cache_metric(gw, "gateway_upstream_cache_backend_errors_total", upstream="u") == 0
