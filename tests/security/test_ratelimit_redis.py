"""The shared rate limiter against a real Redis server: one bucket for every replica, failure modes when Redis
is gone or hangs."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import aiohttp
import pytest
import redis
from prometheus_client import generate_latest

from app.errors import RateLimitBackendError
from app.security.redis_ratelimit import RedisRateLimiter
from app.settings import RateLimitSettings
from tests.security.conftest import auth_with, metric, new_key
from tests.support.gateway import make_settings, running_gateway


def limiter_settings(url: str, prefix: str, **extra: object) -> RateLimitSettings:
    return RateLimitSettings(backend="redis", redis_url=url, redis_prefix=prefix, **extra)  # type: ignore[arg-type]


async def test_two_replicas_share_one_bucket(redis_url: str, redis_prefix: str) -> None:
    a = RedisRateLimiter(limiter_settings(redis_url, redis_prefix))
    b = RedisRateLimiter(limiter_settings(redis_url, redis_prefix))
    await a.start()
    await b.start()
    try:
        decisions = [await (a if i % 2 else b).acquire("key", 20.0, 5) for i in range(6)]
        assert [d.allowed for d in decisions] == [True] * 5 + [False]
        assert decisions[-1].retry_after_s == pytest.approx(0.05, abs=0.02)
        assert decisions[-1].retry_after_header == 1
        # Another key is untouched.
        assert (await a.acquire("other", 20.0, 5)).allowed
        # It refills at the rate, by the server's clock.
        deadline = time.monotonic() + 2
        while not (await b.acquire("key", 20.0, 5)).allowed:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    finally:
        await a.aclose()
        await b.aclose()
    client = redis.Redis.from_url(redis_url)
    try:
        ttl = client.pttl(redis_prefix + "key")
    finally:
        client.close()
    # A bucket is forgotten once it would be full again: Redis does not fill up with idle keys.
    assert 0 < ttl <= 5 / 20 * 1000 + 1000


async def test_two_gateways_enforce_one_limit(redis_url: str, redis_prefix: str) -> None:
    key = new_key("shared", ["transform"])
    settings = make_settings(
        compute={"enabled": True, "workers": 1},
        auth=auth_with(key),
        rate_limit={
            "backend": "redis",
            "redis_url": redis_url,
            "redis_prefix": redis_prefix,
            "rate_per_s": 0.01,
            "burst": 4,
        },
    )
    async with running_gateway(settings) as one, running_gateway(settings) as two, aiohttp.ClientSession() as client:
        statuses = []
        for i in range(8):
            async with client.get(f"{(one, two)[i % 2].url}/transform", headers=key.bearer) as resp:
                statuses.append(resp.status)
    assert sorted(statuses) == [200] * 4 + [429] * 4
    assert statuses[:4] == [200] * 4


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never answers: a Redis that hangs."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                held.append(conn)
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


async def test_a_hanging_redis_costs_one_timeout_then_nothing(silent_server: int) -> None:
    limiter = RedisRateLimiter(limiter_settings(f"redis://127.0.0.1:{silent_server}/0", "x:", redis_timeout_ms=100))
    await limiter.start()
    try:
        started = time.perf_counter()
        with pytest.raises(RateLimitBackendError):
            await limiter.acquire("k", 1.0, 1)
        first = time.perf_counter() - started
        started = time.perf_counter()
        with pytest.raises(RateLimitBackendError):
            await limiter.acquire("k", 1.0, 1)
        second = time.perf_counter() - started
    finally:
        await limiter.aclose()
    assert first < 0.5, f"the timeout was not honoured: {first * 1000:.0f} ms"
    assert second < 0.01, "right after a failure Redis is not asked again"


@pytest.mark.parametrize(("mode", "expected"), [("allow", 200), ("deny", 503)])
async def test_failure_modes_when_redis_is_gone(mode: str, expected: int) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    key = new_key("k", ["transform", "metrics"])
    settings = make_settings(
        compute={"enabled": True, "workers": 1},
        auth=auth_with(key),
        rate_limit={"backend": "redis", "redis_url": f"redis://127.0.0.1:{dead}/0", "failure_mode": mode},
    )
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        async with client.get(f"{gw.url}/transform", headers=key.bearer) as resp:
            assert resp.status == expected
            if expected == 503:
                assert resp.headers["Retry-After"] == "1"
                assert (await resp.json(content_type=None))["type"] == "urn:gateway:problem:overloaded"
        async with client.get(f"{gw.url}/healthz") as resp:
            assert resp.status == 200
        errors = metric(generate_latest(gw.state.metrics.registry).decode(), "gateway_rate_limit_backend_errors_total")
    assert errors >= 1
