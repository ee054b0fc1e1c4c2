"""Per-key token buckets: 429 + Retry-After when empty, other keys untouched, per-key rates."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from app.security.ratelimit import LocalRateLimiter, take
from tests.security.conftest import auth_with, new_key
from tests.support.gateway import make_settings, running_gateway


def test_token_bucket_arithmetic() -> None:
    tokens, d = take(tokens=2.0, elapsed_s=0.0, rate_per_s=1.0, burst=2)
    assert d.allowed
    assert tokens == 1.0
    tokens, d = take(tokens=0.25, elapsed_s=0.0, rate_per_s=0.5, burst=2)
    assert not d.allowed
    assert d.retry_after_s == pytest.approx(1.5)
    assert d.retry_after_header == 2
    # Refill is capped at the burst, however long the key was idle.
    tokens, d = take(tokens=0.0, elapsed_s=3600.0, rate_per_s=10.0, burst=3)
    assert tokens == 2.0
    # A clock that went backwards refills nothing.
    tokens, d = take(tokens=0.5, elapsed_s=-5.0, rate_per_s=10.0, burst=3)
    assert not d.allowed


async def test_local_limiter_refills_with_time() -> None:
    limiter = LocalRateLimiter()
    allowed = [(await limiter.acquire("k", 50.0, 3)).allowed for _ in range(4)]
    assert allowed == [True, True, True, False]
    assert (await limiter.acquire("other", 50.0, 3)).allowed
    deadline = time.monotonic() + 2
    while not (await limiter.acquire("k", 50.0, 3)).allowed:
        assert time.monotonic() < deadline, "the bucket never refilled"
        await asyncio.sleep(0.005)


async def test_each_key_has_its_own_bucket_and_rate() -> None:
    slow = new_key("slow", ["transform"])
    other = new_key("other", ["transform", "metrics"])
    fast = new_key("fast", ["transform"], rate={"rate_per_s": 1000, "burst": 1000})
    settings = make_settings(
        auth=auth_with(slow, other, fast),
        rate_limit={"rate_per_s": 0.01, "burst": 2},
        compute={"enabled": True, "workers": 1},
    )
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        statuses = []
        for _ in range(3):
            async with client.get(f"{gw.url}/transform", headers=slow.bearer) as resp:
                statuses.append(resp.status)
                if resp.status == 429:
                    body = await resp.json(content_type=None)
                    retry_after = resp.headers["Retry-After"]
        assert statuses == [200, 200, 429]
        assert body["type"] == "urn:gateway:problem:rate-limited"
        assert resp.content_type == "application/problem+json"
        assert 1 <= int(retry_after) <= 100  # 1 token at 0.01/s: up to 100 s
        for _ in range(20):
            async with client.get(f"{gw.url}/transform", headers=fast.bearer) as resp:
                assert resp.status == 200
        async with client.get(f"{gw.url}/metrics", headers=other.bearer) as resp:
            text = await resp.text()
    assert 'gateway_rate_limited_total{key="slow"} 1.0' in text
    assert 'gateway_rate_limited_total{key="fast"} 0.0' in text  # primed at 0, never limited


async def test_local_limiter_forgets_the_least_recently_used_bucket() -> None:
    # Token subjects are unbounded: the buckets kept are not.
    limiter = LocalRateLimiter(max_buckets=2)
    assert (await limiter.acquire("a", 0.001, 1)).allowed
    assert (await limiter.acquire("b", 0.001, 1)).allowed
    assert not (await limiter.acquire("a", 0.001, 1)).allowed  # a is now the most recently used
    assert (await limiter.acquire("c", 0.001, 1)).allowed  # b is forgotten
    assert not (await limiter.acquire("a", 0.001, 1)).allowed
    assert (await limiter.acquire("b", 0.001, 1)).allowed, "a forgotten bucket comes back full"
