"""A token bucket per key in Redis, so that every replica draws from one bucket.

One Lua script per request reads, refills, takes and writes the bucket atomically on the server, with the server's
clock (TIME), so replicas whose clocks disagree still share one rate. A failure (Redis down, slow, full pool) is
raised as RateLimitBackendError after at most ``redis_timeout_ms``; the caller applies the configured failure mode.
After a failure Redis is left alone for a second, so that an outage costs no request a timeout.
"""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from app.errors import RateLimitBackendError, ResourceClosedError
from app.redisclient import REDIS_FAILURES, bounded_client, ping_or_warn
from app.security.ratelimit import Decision
from app.settings import RateLimitSettings

log = logging.getLogger(__name__)

# KEYS[1]: the bucket. ARGV: rate per second, burst. Returns {allowed, tokens left, micro-seconds until a token}.
# Numbers go back as strings: Redis truncates Lua numbers to integers in replies.
TOKEN_BUCKET = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
local elapsed = now - ts
if elapsed < 0 then elapsed = 0 end
tokens = math.min(burst, tokens + elapsed * rate / 1000000)
local allowed = 0
local wait_us = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait_us = math.ceil((1 - tokens) * 1000000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
-- A full bucket is the same as no bucket: let Redis forget it once it would have refilled.
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, tostring(tokens), wait_us}
"""

# Connections to Redis, at most; beyond it a request waits (within the timeout) rather than open more.
BACKOFF_AFTER_FAILURE_S = 1.0


class RedisRateLimiter:
    def __init__(self, settings: RateLimitSettings) -> None:
        if settings.redis_url is None:
            raise ValueError("the redis backend needs redis_url")
        self._url = settings.redis_url.get_secret_value()
        self._prefix = settings.redis_prefix
        self._timeout_s = settings.redis_timeout_ms / 1000
        self._client: aioredis.Redis | None = None
        self._script: object | None = None
        self._down_until = 0.0
        self._closed = False

    async def start(self) -> None:
        """Connect and load the script. Redis being down is logged, not fatal: the failure mode covers it."""
        self._client = bounded_client(self._url, timeout_s=self._timeout_s)
        self._script = self._client.register_script(TOKEN_BUCKET)
        await ping_or_warn(
            self._client,
            timeout_s=self._timeout_s,
            log=log,
            who="rate limiter",
            meanwhile="the failure mode applies until it does",
            event="ratelimit_backend_down",
        )

    async def aclose(self) -> None:
        self._closed = True
        if self._client is not None:
            await self._client.aclose()

    async def acquire(self, key: str, rate_per_s: float, burst: int) -> Decision:
        """Raises RateLimitBackendError when Redis cannot answer in time, ResourceClosedError after aclose()."""
        client, script = self._client, self._script
        if self._closed or client is None or script is None:
            raise ResourceClosedError("rate limiter is closed")
        loop = asyncio.get_running_loop()
        if loop.time() < self._down_until:
            raise RateLimitBackendError("redis failed a moment ago")
        try:
            async with asyncio.timeout(self._timeout_s):
                reply = await script(keys=[self._prefix + key], args=[repr(float(rate_per_s)), str(burst)])  # type: ignore[operator]
        except REDIS_FAILURES as exc:
            self._down_until = loop.time() + BACKOFF_AFTER_FAILURE_S
            raise RateLimitBackendError(f"redis: {type(exc).__name__}") from exc
        allowed, tokens, wait_us = reply
        return Decision(bool(int(allowed)), float(tokens), int(wait_us) / 1_000_000)
