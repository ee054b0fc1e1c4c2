"""The shared store: entries in Redis, so that every replica reads what one of them stored.

The client and its bounds are the shared rate limiter's (app/redisclient.py): a blocking pool of a few
connections, one attempt per command within ``redis_timeout_ms``, no retries inside the client. A failure (Redis
down, slow, the pool full) is a CacheBackendError after at most that long; the store turns it into a miss (or a
store skipped), counted, and never fails a source for it. After a failure Redis is left alone for a second, so that
an outage costs no call a timeout.

Each entry expires in Redis when it is of no more use (its fresh and stale windows over). How much Redis holds in
all is Redis's own business (``maxmemory`` with an LRU policy); ``max_bytes`` bounds each entry here.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

import orjson
import redis.asyncio as aioredis

from app.errors import CacheBackendError, ResourceClosedError
from app.redisclient import REDIS_FAILURES, bounded_client, ping_or_warn
from app.upstream.cache.entry import Entry, decode, encode

log = logging.getLogger(__name__)

BACKOFF_AFTER_FAILURE_S = 1.0
# Redis refuses expiry times past what it can hold; no entry is of use for a year anyway.
MAX_TTL_MS = 365 * 86_400 * 1000


class RedisCache:
    """One connection pool to the shared cache, for every upstream whose entries live there."""

    def __init__(self, url: str, *, prefix: str, timeout_s: float) -> None:
        self._url = url
        self.prefix = prefix
        self._timeout_s = timeout_s
        self._client: aioredis.Redis | None = None
        self._down_until = 0.0
        self._closed = False

    async def start(self) -> None:
        """Connect. Redis being down is logged, not fatal: every lookup is then a miss until it answers."""
        self._client = bounded_client(self._url, timeout_s=self._timeout_s)
        await ping_or_warn(
            self._client,
            timeout_s=self._timeout_s,
            log=log,
            who="cache",
            meanwhile="lookups are misses until it does",
            event="cache_backend_down",
        )

    async def aclose(self) -> None:
        self._closed = True
        if self._client is not None:
            await self._client.aclose()

    async def get(self, key: str) -> bytes | None:
        """Raises CacheBackendError when Redis cannot answer in time, ResourceClosedError after aclose()."""
        client = self._ready()
        reply = await self._bounded(client.get(self.prefix + key))
        return reply if isinstance(reply, bytes) else None

    async def set(self, key: str, value: bytes, ttl_ms: int) -> None:
        """Raises CacheBackendError when Redis cannot answer in time, ResourceClosedError after aclose()."""
        client = self._ready()
        await self._bounded(client.set(self.prefix + key, value, px=ttl_ms))

    def _ready(self) -> aioredis.Redis:
        if self._closed or self._client is None:
            raise ResourceClosedError("the shared cache is closed")
        if asyncio.get_running_loop().time() < self._down_until:
            raise CacheBackendError("redis failed a moment ago")
        return self._client

    async def _bounded(self, command: object) -> object:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._timeout_s):
                return await command  # type: ignore[misc]
        except REDIS_FAILURES as exc:
            self._down_until = loop.time() + BACKOFF_AFTER_FAILURE_S
            raise CacheBackendError(f"redis: {type(exc).__name__}") from exc


class RedisStore:
    """One upstream's entries in the shared cache."""

    shared = True

    def __init__(
        self,
        cache: RedisCache,
        upstream: str,
        max_bytes: int,
        *,
        clock: Callable[[], float] = time.time,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self._cache = cache
        self._namespace = f"{upstream}:"
        self._max_bytes = max_bytes
        self._clock = clock
        self._on_error = on_error

    async def get(self, key: str) -> Entry | None:
        """The entry, or None: absent, unreadable, past all use, or Redis failed (counted)."""
        try:
            raw = await self._cache.get(self._namespace + key)
        except CacheBackendError:
            self._failed()
            return None
        if raw is None:
            return None
        entry = decode(raw)
        if entry is None or self._clock() >= entry.keep_until():
            return None
        return entry

    async def put(self, key: str, entry: Entry) -> bool:
        """Store ``entry`` until it is of no more use; False when it is larger than the budget or Redis failed."""
        if entry.size(key) > self._max_bytes:
            return False
        ttl_ms = math.ceil((entry.keep_until() - self._clock()) * 1000)
        if ttl_ms <= 0:
            return False
        try:
            raw = encode(entry)
        except orjson.JSONEncodeError:  # a header value JSON cannot hold (a lone surrogate): not stored
            return False
        try:
            await self._cache.set(self._namespace + key, raw, min(ttl_ms, MAX_TTL_MS))
        except CacheBackendError:
            self._failed()
            return False
        return True

    def _failed(self) -> None:
        if self._on_error is not None:
            self._on_error()
