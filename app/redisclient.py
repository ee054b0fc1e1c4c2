"""A Redis client bounded the way the gateway uses Redis (the shared rate limiter, the shared cache): a blocking
pool of a few connections, one attempt per command within a timeout, no retries inside the client. Each user has
its own failure mode for the errors this lets through, after at most that timeout."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

MAX_CONNECTIONS = 32
# What a failed command raises: Redis's own errors, the socket's, and the pool's wait running out.
REDIS_FAILURES = (redis.exceptions.RedisError, OSError, TimeoutError)


def bounded_client(url: str, *, timeout_s: float) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        # No retries inside the client: one bounded attempt, then the caller's failure mode.
        retry=Retry(NoBackoff(), 0),
    )
    return aioredis.Redis.from_pool(pool)


async def ping_or_warn(
    client: aioredis.Redis, *, timeout_s: float, log: logging.Logger, who: str, meanwhile: str, event: str
) -> None:
    """Ping once at start-up. Redis being down is logged (``meanwhile``: what happens until it answers), never
    fatal."""
    try:
        async with asyncio.timeout(timeout_s * 5):
            await client.ping()
    except REDIS_FAILURES as exc:
        log.warning("%s: redis does not answer (%s); %s", who, type(exc).__name__, meanwhile, extra={"event": event})
