"""Calls to configured upstreams: concurrency limits, per-try timeouts within the deadline, retries with backoff
and a budget, and a circuit breaker per upstream. Everything here runs on the event loop."""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from yarl import URL

from app.errors import (
    BadResponseError,
    CircuitOpenError,
    DeadlineExceededError,
    ResponseTooLargeError,
    SourceError,
    StartupError,
    UpstreamConnectError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from app.settings import Settings, UpstreamConfig
from app.upstream.balancer import Endpoint
from app.upstream.breaker import BreakerState, CircuitBreaker
from app.upstream.cache.entry import Entry
from app.upstream.cache.layer import CachedCalls, CacheObserver, CacheOutcome
from app.upstream.cache.setup import cached_calls, shared_cache
from app.upstream.call import Reply, call_once
from app.upstream.endpoints import EndpointPool
from app.upstream.resolver import Resolver, SystemResolver
from app.upstream.retry import IDEMPOTENT_METHODS, RetryBudget, backoff_s, is_transient, parse_retry_after
from app.upstream.session import HttpSession, new_session

# A loop that stood still for less than this excuses no timeout, however short the timeout: a turn of the loop
# that long is its ordinary business under load.
MIN_STALL_S = 0.05
# A retry is pointless when less than this is left before the deadline.
MIN_ATTEMPT_S = 0.005
# A cancellation this close to the deadline, of a call the deadline's timer cuts, is that timer's (loops fire
# timers up to a clock tick early: uvloop's clock counts milliseconds).
DEADLINE_SLACK_S = 0.005


class UpstreamObserver(Protocol):
    """Metrics hook; every method is called on the event loop and must not block."""

    def semaphore_wait(self, upstream: str, seconds: float) -> None: ...
    def attempt(self, upstream: str, outcome: str, seconds: float) -> None: ...
    def retry(self, upstream: str) -> None: ...
    def budget_exhausted(self, upstream: str) -> None: ...
    def breaker_transition(self, upstream: str, to: BreakerState) -> None: ...
    def breaker_refused(self, upstream: str) -> None: ...


@dataclass
class Upstream:
    name: str
    config: UpstreamConfig
    semaphore: asyncio.Semaphore
    breaker: CircuitBreaker
    budget: RetryBudget
    # The gateway's own headers for this upstream (credentials), and the TLS context its calls use (True: the
    # system's trust store).
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    ssl: ssl.SSLContext | bool = True
    in_flight: int = 0
    # Several endpoints (UpstreamConfig.balanced, decided at start-up): each attempt picks one. None: the base URL
    # is called as it is, and a call pays nothing for balancing.
    endpoints: EndpointPool | None = None
    # Its cache and single flight (app/upstream/cache/), or None: then every call goes straight to the upstream.
    cache: CachedCalls[Result] | None = None


@dataclass(slots=True)
class _Call:
    """One call, as each of its attempts needs it. ``cut``: the caller cancels the call at the deadline
    (UpstreamClient.call's ``cut_at_deadline``); ``last``: the endpoint its last attempt went to, which a retry
    avoids (balanced upstreams only)."""

    up: Upstream
    out: Outbound
    deadline: float
    headers: Mapping[str, str]
    progress: Progress
    cut: bool
    last: Endpoint | None = None


@dataclass
class Progress:
    """Filled in as a call proceeds, so a caller cancelled by its deadline can still report the attempts.

    ``attempts`` counts requests actually sent: one refused by the open breaker, or whose deadline passed while it
    waited for a slot, sent nothing and counts for nothing."""

    attempts: int = 0
    # How the cache took part: "hit", "miss", "coalesced" or "stale"; None for an upstream without one.
    cache: CacheOutcome | None = None


@dataclass(frozen=True)
class Outbound:
    method: str
    # Built by app.upstream.paths.join_url from the upstream's base URL and a confined path, when the request is
    # planned: checked once there, never rebuilt per attempt.
    url: URL
    params: Mapping[str, str] = field(default_factory=dict)
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    status: int
    body: bytes
    headers: Mapping[str, str]
    attempts: int


class UpstreamClient:
    def __init__(
        self,
        settings: Settings,
        http: HttpSession,
        *,
        observer: UpstreamObserver | None = None,
        cache_observer: CacheObserver | None = None,
        rng: random.Random | None = None,
        resolver: Resolver | None = None,
        clock: Callable[[], float] = time.monotonic,
        loop_stall: Callable[[float], float] | None = None,
    ) -> None:
        """``resolver``: where the names of upstreams with ``dns_refresh_s`` are resolved (default: the system's,
        in threads of its own); ``clock``: the outlier ejection's time; ``loop_stall``: how long the event loop
        stood still, at worst, over the last given seconds (the loop-lag sampler's), which decides whether a
        timeout is held against the upstream."""
        self._http = http
        self._loop_stall = loop_stall
        self._observer = observer
        self._cache_observer = cache_observer
        self._rng = rng or random.Random()
        self._resolver = resolver
        self._own_resolver: SystemResolver | None = None
        self._clock = clock
        self._global = asyncio.Semaphore(settings.http.max_in_flight)
        self._shared_cache = shared_cache(settings)
        self.upstreams = {name: self._make(name, cfg) for name, cfg in settings.upstreams.items()}

    def _make(self, name: str, cfg: UpstreamConfig) -> Upstream:
        def transition(to: BreakerState) -> None:
            if self._observer is not None:
                self._observer.breaker_transition(name, to)

        headers = {header: value.get_secret_value() for header, value in cfg.headers.items()}
        return Upstream(
            name=name,
            config=cfg,
            semaphore=asyncio.Semaphore(cfg.max_concurrency),
            breaker=CircuitBreaker(cfg.breaker, on_transition=transition),
            budget=RetryBudget(cfg.retry),
            headers=headers,
            cache=cached_calls(
                name,
                cfg,
                gateway_headers=headers,
                redis=self._shared_cache,
                answer=_cached_result,
                observer=self._cache_observer,
            ),
        )

    async def start(self) -> None:
        """Load each upstream's TLS files, then open the endpoints of those that have several (resolving their
        names once). Raises StartupError naming the upstream when its TLS files cannot be used."""
        for up in self.upstreams.values():
            if up.config.tls.configured:
                # A few small files, read once before the gateway serves: no request waits on this.
                up.ssl = _tls_context(up.name, up.config)
        balanced = [up for up in self.upstreams.values() if up.config.balanced]
        if self._resolver is None and any(up.config.dns_refresh_s is not None for up in balanced):
            self._own_resolver = self._resolver = SystemResolver()
            await self._own_resolver.start()
        for up in balanced:
            up.endpoints = EndpointPool(
                up.name, up.config, tls=up.ssl, new_session=new_session, resolver=self._resolver,
                clock=self._clock, rng=self._rng,
            )  # fmt: skip
            # Set before start(): aclose() closes a pool that failed half way.
            await up.endpoints.start()
        if self._shared_cache is not None:
            await self._shared_cache.start()

    async def aclose(self) -> None:
        for up in self.upstreams.values():
            if up.cache is not None:
                await up.cache.aclose()
            if up.endpoints is not None:
                await up.endpoints.aclose()
        if self._shared_cache is not None:
            await self._shared_cache.aclose()
        if self._own_resolver is not None:
            await self._own_resolver.aclose()

    def call(
        self,
        name: str,
        out: Outbound,
        *,
        deadline: float,
        headers: Mapping[str, str],
        progress: Progress,
        cut_at_deadline: bool = False,
    ) -> Coroutine[Any, Any, Result]:
        """Call upstream ``name`` until success, a non-transient failure, the deadline, or the retry budget.

        Raises a SourceError leaf (its ``attempts`` set to the requests actually sent, 0 when none was):
        CircuitOpenError, DeadlineExceededError, UpstreamTimeoutError, UpstreamConnectError, UpstreamStatusError,
        ResponseTooLargeError, BadResponseError. Through the upstream's cache (when it has one), a fresh or stale
        entry or another caller's call may answer instead (``progress.cache`` says which).

        ``cut_at_deadline``: the caller cancels this call when the deadline passes (the aggregate's one timer does);
        then an attempt allowed until the deadline or beyond needs no timer of its own. A call through a cache runs
        in a task of its own, which no caller's cancellation reaches: its attempts always keep their timers.
        """
        up = self.upstreams[name]
        # Not a coroutine itself: the call's own coroutine is handed back, so that an upstream without a cache
        # pays one attribute test per call and no extra frame.
        if up.cache is not None:
            uncut = _Call(up, out, deadline, headers, progress, cut=False)
            return up.cache.call(out, deadline, progress, lambda: self._call(uncut))
        return self._call(_Call(up, out, deadline, headers, progress, cut=cut_at_deadline))

    async def _call(self, call: _Call) -> Result:
        up, out, deadline, progress = call.up, call.out, call.deadline, call.progress
        name = up.name
        loop = asyncio.get_running_loop()
        policy = up.config.retry
        retryable_method = out.method in IDEMPOTENT_METHODS
        up.budget.record_call()
        attempt = 0  # tries, sent or not: the retry policy's count
        while True:
            attempt += 1
            try:
                reply = await self._attempt(call)
                if reply.status >= 300:
                    raise UpstreamStatusError(f"{name} answered {reply.status}", status=reply.status)
                return Result(status=reply.status, body=reply.body, headers=reply.headers, attempts=progress.attempts)
            except SourceError as err:
                if not (retryable_method and is_transient(err)) or attempt >= policy.attempts:
                    _note_attempts(err, progress.attempts)
                    raise
                retry_after = parse_retry_after(err.retry_after) if isinstance(err, UpstreamStatusError) else None
                delay = max(backoff_s(policy, attempt, self._rng), retry_after or 0.0)
                if loop.time() + delay + MIN_ATTEMPT_S >= deadline:
                    _note_attempts(err, progress.attempts)
                    raise
                if not up.budget.try_spend():
                    if self._observer is not None:
                        self._observer.budget_exhausted(name)
                    err.message += " (retry budget exhausted)"
                    _note_attempts(err, progress.attempts)
                    raise
            if self._observer is not None:
                self._observer.retry(name)
            await asyncio.sleep(delay)

    async def _attempt(self, call: _Call) -> Reply:
        up = call.up
        if not up.breaker.try_acquire():
            # Counted apart from attempts (nothing was sent): an outage is mostly refusals once the breaker opens.
            if self._observer is not None:
                self._observer.breaker_refused(up.name)
            raise CircuitOpenError(
                f"{up.name} circuit is open; next probe in {up.breaker.retry_after_s() * 1000:.0f} ms"
            )
        try:
            reply = await self._send(call)
        except DeadlineExceededError:
            # The client's deadline, not the upstream, cut this attempt short: not the breaker's business.
            up.breaker.release_probe()
            raise
        except SourceError as err:
            if _is_upstream_fault(err):
                up.breaker.record_failure()
            else:
                up.breaker.release_probe()
            raise
        except BaseException:
            # Cancelled (deadline or client gone) before an outcome: hand a half-open probe permit back.
            up.breaker.release_probe()
            raise
        up.breaker.record_success()
        return reply

    async def _send(self, call: _Call) -> Reply:
        up, out, deadline, progress = call.up, call.out, call.deadline, call.progress
        loop = asyncio.get_running_loop()
        waited_from = loop.time()
        # Per-upstream slot first, then a global one: a saturated upstream never holds global slots while it
        # waits. Both `async with` blocks release on cancellation (the deadline), so no slot leaks.
        async with up.semaphore, self._global:
            started = loop.time()
            if self._observer is not None:
                self._observer.semaphore_wait(up.name, started - waited_from)
            remaining = deadline - started
            if remaining <= MIN_ATTEMPT_S:
                raise DeadlineExceededError(f"the deadline passed while waiting for a slot on {up.name}")
            per_try = up.config.timeout_ms / 1000
            # The caller's deadline timer cuts what is still running at the deadline: an attempt allowed that long
            # needs no timer of its own (aiohttp's costs a timer and two context objects per call).
            own_timer = not call.cut or per_try < remaining
            # The client's allowlisted headers, the gateway's own per request, then its credentials for this
            # upstream; the settings keep the three sets of names apart.
            send_headers = {**out.headers, **call.headers, **up.headers}
            send_headers["X-Request-Deadline-Ms"] = str(max(1, int(remaining * 1000)))
            session, url, server_hostname = self._http.session, out.url, None
            pool, endpoint = up.endpoints, None
            if pool is not None:
                # Picked once the slots are held, so that the in-flight counts it compares are the real ones; no
                # await between the pick (which counts the call in flight) and the try whose finally releases it.
                endpoint = call.last = pool.pick(call.last)
                session, url = endpoint.session or session, endpoint.url_for(url)
                server_hostname = endpoint.server_hostname
                if endpoint.host_header is not None:
                    send_headers["Host"] = endpoint.host_header
            fault: bool | None = None  # the endpoint's verdict: None when the attempt says nothing about it
            up.in_flight += 1
            progress.attempts += 1  # from here on the request is on its way (or failing to connect, which counts)
            try:
                reply = await call_once(
                    session,
                    upstream=up.name,
                    method=out.method,
                    url=url,
                    params=out.params,
                    body=out.body,
                    headers=send_headers,
                    timeout_s=min(per_try, remaining) if own_timer else None,
                    connect_timeout_s=up.config.connect_timeout_ms / 1000,
                    max_bytes=up.config.max_response_bytes,
                    ssl=up.ssl,
                    server_hostname=server_hostname,
                )
                fault = False
            except UpstreamTimeoutError as exc:
                if remaining < per_try and exc.limit_s >= remaining:
                    self._observe(up.name, "deadline", started)
                    raise DeadlineExceededError(f"{up.name} did not answer before the deadline") from exc
                stalled = self._stalled(exc, loop.time() - started)
                if stalled is not None:
                    exc.stalled_s = stalled
                    exc.message += (
                        f" (the gateway's event loop stood still for {stalled * 1000:.0f} ms of it: not held against"
                        f" {up.name})"
                    )
                    self._observe(up.name, "stalled", started)
                    raise
                fault = True
                self._observe(up.name, exc.kind, started)
                raise
            except SourceError as exc:
                fault = _endpoint_fault(exc)
                self._observe(up.name, exc.kind, started)
                raise
            except asyncio.CancelledError:
                if not own_timer and loop.time() >= deadline - DEADLINE_SLACK_S:
                    self._observe(up.name, "deadline", started)  # as an attempt with its own timer says it
                raise
            finally:
                up.in_flight -= 1
                if endpoint is not None and pool is not None:
                    pool.release(endpoint, fault)
        self._observe(up.name, "ok", started)
        return reply

    def _stalled(self, exc: UpstreamTimeoutError, elapsed: float) -> float | None:
        """How long the event loop stood still during an attempt that timed out after ``elapsed`` seconds, when
        that is at least half the time allowed (and MIN_STALL_S): the gateway, not the upstream, ran out this
        timeout (a burst of connections handled in one turn, a long collection, a CPU-throttled or paused process).
        An answer or a connection that arrived meanwhile waits unread until the loop turns, and then the expired
        timer wins."""
        if self._loop_stall is None:
            return None
        stalled = self._loop_stall(elapsed)
        return stalled if stalled * 2 >= exc.limit_s and stalled >= MIN_STALL_S else None

    def _observe(self, upstream: str, outcome: str, started: float) -> None:
        if self._observer is not None:
            self._observer.attempt(upstream, outcome, asyncio.get_running_loop().time() - started)


def _cached_result(entry: Entry) -> Result:
    return Result(status=entry.status, body=entry.body, headers=entry.headers, attempts=0)


def _is_upstream_fault(err: SourceError) -> bool:
    if isinstance(err, UpstreamTimeoutError) and err.stalled_s is not None:
        return False
    if isinstance(err, ResponseTooLargeError | BadResponseError):
        return True
    # Every 5xx is the upstream failing, retried or not (a 500 is not worth a retry, but it is worth counting).
    if isinstance(err, UpstreamStatusError) and err.status is not None and err.status >= 500:
        return True
    return is_transient(err)


def _endpoint_fault(err: SourceError) -> bool:
    """What ejects an endpoint: no connection, no answer in time, a 5xx, or not HTTP at all. A 429 or an
    oversized body says nothing against the endpoint."""
    if isinstance(err, UpstreamStatusError):
        return err.status is not None and err.status >= 500
    return isinstance(err, UpstreamConnectError | UpstreamTimeoutError | BadResponseError)


def _note_attempts(err: SourceError, attempts: int) -> None:
    err.attempts = attempts  # the requests sent: 0 when the breaker or the deadline stopped the first one
    if attempts > 1 and "attempts" not in err.message:
        err.message = f"{err.message} after {attempts} attempts"


def _tls_context(name: str, cfg: UpstreamConfig) -> ssl.SSLContext:
    tls = cfg.tls
    try:
        context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file is not None else None)
        if tls.client_cert_file is not None and tls.client_key_file is not None:
            # A password always, even an empty one: without it OpenSSL would prompt on the terminal for an
            # encrypted key.
            password = tls.client_key_password.get_secret_value() if tls.client_key_password is not None else ""
            context.load_cert_chain(tls.client_cert_file, tls.client_key_file, password=password)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"upstream {name}: its TLS files cannot be used: {exc}") from exc
    return context


def tls_problems(settings: Settings) -> list[str]:
    """Each upstream whose TLS files cannot be used, as ``gateway check-config`` reports it (nothing is sent)."""
    problems = []
    for name, cfg in settings.upstreams.items():
        if cfg.tls.configured:
            try:
                _tls_context(name, cfg)
            except StartupError as exc:
                problems.append(f"upstreams.{name}.tls: {exc}")
    return problems
