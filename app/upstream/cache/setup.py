"""Decided once, at start-up: which upstreams get a cache, a single flight, or neither; and the one connection to
the shared cache's Redis when any upstream keeps its entries there. An upstream with neither is called exactly as
before, with no per-call cost."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from app.settings import Settings, UpstreamConfig
from app.upstream.cache.entry import Entry
from app.upstream.cache.layer import CachedCalls, CacheObserver, R, Store
from app.upstream.cache.memory import MemoryStore

if TYPE_CHECKING:
    from app.upstream.cache.redis_store import RedisCache


def shared_cache(settings: Settings) -> RedisCache | None:
    """The shared cache's Redis connection (not yet started), when some upstream keeps its entries there."""
    url = settings.cache_redis_url
    if url is None or not any(up.cache.enabled and up.cache.backend == "redis" for up in settings.upstreams.values()):
        return None
    # Imported here, as the rate limiter's is (app/security/guard.py): redis.asyncio takes up to a second to
    # import, which only a gateway that uses it should pay at start-up.
    from app.upstream.cache.redis_store import RedisCache

    return RedisCache(url.get_secret_value(), prefix=settings.cache.redis_prefix,
                      timeout_s=settings.cache.redis_timeout_ms / 1000)  # fmt: skip


def cached_calls(
    name: str,
    config: UpstreamConfig,
    *,
    gateway_headers: Mapping[str, str],
    redis: RedisCache | None,
    answer: Callable[[Entry], R],
    observer: CacheObserver | None,
) -> CachedCalls[R] | None:
    """The cache and single flight in front of upstream ``name``, or None when it has neither."""
    cache = config.cache
    if not cache.active:
        return None
    store: Store | None = None
    if cache.enabled and cache.backend == "redis":
        assert redis is not None, "settings validation requires a redis URL for a redis-backed cache"
        from app.upstream.cache.redis_store import RedisStore

        store = RedisStore(redis, name, cache.max_bytes, on_error=_backend_errors(name, observer))
    elif cache.enabled:
        store = MemoryStore(cache.max_bytes, on_evict=_evictions(name, observer))
    return CachedCalls(name, cache, gateway_headers=gateway_headers, store=store, answer=answer, observer=observer)


def _backend_errors(name: str, observer: CacheObserver | None) -> Callable[[], None] | None:
    if observer is None:
        return None
    return lambda: observer.cache_backend_error(name)


def _evictions(name: str, observer: CacheObserver | None) -> Callable[[int], None] | None:
    if observer is None:
        return None
    return lambda count: observer.cache_evicted(name, count)
