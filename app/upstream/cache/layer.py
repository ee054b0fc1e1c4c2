"""One upstream's cache and single flight, in front of its calls (hooked in by app/upstream/client.py).

The order, for a GET or HEAD without a body (anything else goes straight to the upstream):

  1. lookup      the store, unless the request said no-cache/no-store; a fresh entry is the answer (``hit``). An
                 entry stored for requests without credentials never answers one that forwarded Authorization or
                 Cookie. An expired entry still within its stale window is kept aside.
  2. coalesce    join the call in flight for the same key, or lead a new one (``coalesced`` / ``miss``); without
                 coalescing, call alone (``miss``).
  3. call        the upstream, with its limits, retries and breaker (the client's own call).
  4. store       inside the shared call, before its waiters are answered, when RFC 9111 allows it
                 (app/upstream/cache/policy.py) and the entry fits the budget.
  5. on failure  a timeout, a connection failure, a 5xx or an open breaker, with an entry kept aside at 1: that
                 entry is the answer (``stale``).

A waiter that joined a flight with an earlier deadline than its own, and saw it end at that deadline, leads a call
of its own with the time it has left. A waiter's own deadline is enforced by its caller (the aggregate's deadline
timer cancels it, app/aggregate/execute.py): cancelled, it only leaves the flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Generic, Literal, Protocol, TypeVar

from app.errors import (
    CircuitOpenError,
    DeadlineExceededError,
    SourceError,
    UpstreamConnectError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from app.settings import UpstreamCache
from app.upstream.cache.entry import Entry, kept_headers
from app.upstream.cache.flight import FlightCancelledError, SingleFlight
from app.upstream.cache.keys import CallKey, KeyMaker
from app.upstream.cache.policy import freshness

CacheOutcome = Literal["hit", "miss", "coalesced", "stale"]
# A flight that ended at its leader's deadline is worth a call of one's own only with this much time left.
MIN_OWN_CALL_S = 0.005


class Answer(Protocol):
    @property
    def status(self) -> int: ...
    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> Mapping[str, str]: ...


class Call(Protocol):
    @property
    def method(self) -> str: ...
    @property
    def url(self) -> object: ...
    @property
    def params(self) -> Mapping[str, str]: ...
    @property
    def body(self) -> Any: ...
    @property
    def headers(self) -> Mapping[str, str]: ...


class Tracker(Protocol):
    attempts: int
    cache: CacheOutcome | None


class Store(Protocol):
    shared: bool

    async def get(self, key: str) -> Entry | None: ...
    async def put(self, key: str, entry: Entry) -> bool: ...


class CacheObserver(Protocol):
    """Metrics hook; called on the event loop, must not block."""

    def cache_result(self, upstream: str, result: CacheOutcome) -> None: ...
    def cache_evicted(self, upstream: str, entries: int) -> None: ...
    def cache_backend_error(self, upstream: str) -> None: ...


R = TypeVar("R", bound=Answer)
# The caller's own call to the upstream, within its deadline, counting its attempts in its tracker: when it leads
# a flight, the call every waiter shares.
Fetch = Callable[[], Awaitable[R]]


def worth_stale(err: SourceError) -> bool:
    """The failures an expired entry may stand in for: the upstream unreachable, slow, failing, or its breaker open."""
    if isinstance(err, UpstreamTimeoutError | UpstreamConnectError | CircuitOpenError):
        return True
    return isinstance(err, UpstreamStatusError) and err.status is not None and err.status >= 500


class CachedCalls(Generic[R]):
    def __init__(
        self,
        upstream: str,
        config: UpstreamCache,
        *,
        gateway_headers: Mapping[str, str],
        store: Store | None,
        answer: Callable[[Entry], R],
        observer: CacheObserver | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = upstream
        self.store = store
        self._keys = KeyMaker(upstream, gateway_headers)
        self._default_ttl_s = config.default_ttl_s
        self._stale_s = config.stale_if_error_s
        self._flights: SingleFlight[R] | None = SingleFlight(upstream) if config.coalescing else None
        self._answer = answer
        self._observer = observer
        self._clock = clock

    @property
    def in_flight(self) -> int:
        return len(self._flights) if self._flights is not None else 0

    @property
    def waiters(self) -> int:
        return self._flights.waiters if self._flights is not None else 0

    def snapshot(self) -> dict[str, object]:
        """For /debug/pools: the store, what it holds (in memory), the calls in flight and their waiters."""
        held = {"entries": getattr(self.store, "entries", None), "bytes": getattr(self.store, "bytes_held", None)}
        kind = None if self.store is None else ("redis" if self.store.shared else "memory")
        return {"store": kind, **held, "flights": self.in_flight, "waiters": self.waiters}

    async def aclose(self) -> None:
        if self._flights is not None:
            await self._flights.aclose()

    async def call(self, out: Call, deadline: float, progress: Tracker, fetch: Fetch[R]) -> R:
        """Answer ``out`` from the cache, a call in flight, or ``fetch``; raises what ``fetch`` raises (a SourceError
        leaf), unless a stale entry stands in for it."""
        key = self._keys.key(out.method, out.url, out.params, out.body, out.headers)
        if key is None:
            return await fetch()
        stale: Entry | None = None
        if self.store is not None and key.rules.lookup:
            entry = await self.store.get(key.store)
            if entry is not None and (entry.with_credentials or not key.private):
                now = self._clock()
                if entry.fresh(now):
                    return self._from_entry(progress, "hit", entry)
                if entry.usable_stale(now):
                    stale = entry
        loop = asyncio.get_running_loop()
        while True:
            try:
                return self._observed(progress, await self._share(key, deadline, progress, fetch))
            except DeadlineExceededError:
                if progress.cache == "coalesced" and loop.time() + MIN_OWN_CALL_S < deadline:
                    continue  # the flight's leader had less time than this waiter: call with what is left
                self._count(progress)
                raise
            except SourceError as err:
                if stale is not None and worth_stale(err) and stale.usable_stale(self._clock()):
                    return self._from_entry(progress, "stale", stale)
                self._count(progress)
                raise

    async def _share(self, key: CallKey, deadline: float, progress: Tracker, fetch: Fetch[R]) -> R:
        if self._flights is None:
            progress.cache = "miss"
            return await self._fetch_and_store(key, fetch)
        flight, leader = self._flights.join(key.flight, lambda: self._fetch_and_store(key, fetch))
        progress.cache = "miss" if leader else "coalesced"
        try:
            # Cancellation-safe: a waiter cancelled here only leaves the flight (flight.py).
            return await flight.wait()
        except FlightCancelledError as exc:
            raise UpstreamConnectError(f"{self.name}: the shared call was cancelled (the gateway is stopping)") from exc

    async def _fetch_and_store(self, key: CallKey, fetch: Fetch[R]) -> R:
        result = await fetch()
        if self.store is not None and key.rules.store:
            now = self._clock()
            fresh = freshness(
                result.status,
                result.headers,
                private_request=key.private,
                default_ttl_s=self._default_ttl_s,
                now=now,
            )
            if fresh is not None:
                entry = Entry(
                    status=result.status,
                    body=result.body,
                    headers=kept_headers(result.headers),
                    stored_at=now,
                    age_s=fresh.age_s,
                    lifetime_s=fresh.lifetime_s,
                    stale_s=self._stale_s if fresh.stale_ok else 0.0,
                    with_credentials=fresh.with_credentials,
                )
                # Before the waiters have the answer: the next identical call, even right after, finds it stored.
                await self.store.put(key.store, entry)
        return result

    def _from_entry(self, progress: Tracker, outcome: CacheOutcome, entry: Entry) -> R:
        progress.cache = outcome
        if self._observer is not None:
            self._observer.cache_result(self.name, outcome)
        return self._answer(entry)

    def _observed(self, progress: Tracker, result: R) -> R:
        self._count(progress)
        return result

    def _count(self, progress: Tracker) -> None:
        if self._observer is not None and progress.cache in ("miss", "coalesced"):
            self._observer.cache_result(self.name, "coalesced" if progress.cache == "coalesced" else "miss")
