"""The endpoints of one upstream that has several (``endpoints``, or a host re-resolved every ``dns_refresh_s``):
where they come from, their connections, their optional health checks, and their draining.

An endpoint that leaves the set (gone from DNS) is drained: it takes no new call at once, the calls it has in
flight finish, and then its connector, with every connection it holds, is closed. One connector per endpoint makes
that exact without reaching into aiohttp's pool. start()/aclose(); the lifespan closes it with the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypedDict
from urllib.parse import urlsplit

import aiohttp

from app.errors import ResourceClosedError
from app.settings import UpstreamConfig
from app.upstream.balancer import Balancer, Endpoint
from app.upstream.ejection import OutlierDetector
from app.upstream.resolver import Resolver, is_address

log = logging.getLogger("app.upstream")

SessionFactory = Callable[[int], aiohttp.ClientSession]
# The most addresses one name contributes: a runaway DNS answer must not open thousands of connectors.
MAX_ADDRESSES = 256


@dataclass(frozen=True)
class _Origin:
    scheme: str
    host: str
    port: int


def _origin(url: str) -> _Origin:
    parts = urlsplit(url)
    scheme = parts.scheme
    return _Origin(scheme, parts.hostname or "", parts.port or (443 if scheme == "https" else 80))


def _authority(host: str, port: int, scheme: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port == (443 if scheme == "https" else 80) else f"{shown}:{port}"


class EndpointView(TypedDict):
    """One endpoint as /debug shows it."""

    endpoint: str
    state: str  # active, ejected, draining
    in_flight: int
    calls: int
    failures: int
    consecutive_failures: int
    ejections: int
    ejected_for_s: float | None  # until it returns


class EndpointPool:
    def __init__(
        self,
        name: str,
        cfg: UpstreamConfig,
        *,
        tls: ssl.SSLContext | bool,
        new_session: SessionFactory,
        resolver: Resolver | None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self._cfg = cfg
        self._tls = tls
        self._new_session = new_session
        self._resolver = resolver if cfg.dns_refresh_s is not None else None
        self.balancer = Balancer(
            cfg.policy,
            OutlierDetector(cfg.outlier, clock=clock),
            rng=rng,
            on_ejected=self._ejected,
            on_returned=self._returned,
        )
        self._origins = [_origin(url) for url in (cfg.endpoints or [cfg.base_url])]
        base = _origin(cfg.base_url)
        # base_url beside endpoints it is not one of names the service: its name goes to every endpoint.
        self._service = None if base in self._origins else base
        self._last: dict[_Origin, list[str]] = {}  # each name's last good answer
        self._failing: set[_Origin] = set()
        self._tasks: set[asyncio.Task[None]] = set()  # the refresh and the health checks: cancelled by aclose()
        self._closing: set[asyncio.Task[None]] = set()  # drained connectors closing: awaited by aclose()
        self._draining: set[Endpoint] = set()  # gone from the set, calls still in flight
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Resolve the names and open the endpoints; then refresh and check them in the background. A name that
        cannot be resolved yet is dialled as it is (the connector resolves it) until it can."""
        await self.refresh()
        refresh_s = self._cfg.dns_refresh_s
        if refresh_s is not None and not all(is_address(o.host) for o in self._origins):
            self._spawn(self._every(refresh_s, self.refresh), "dns-refresh")
        if self._cfg.health_check.path is not None:
            self._spawn(self._every(self._cfg.health_check.interval_s, self.check_health), "health-check")

    async def aclose(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self._closing:
            # Never cancelled half way: a connector cut short would leave its sockets to the garbage collector.
            await asyncio.wait(self._closing)
        endpoints = [*self.balancer.endpoints.values(), *self._draining]
        sessions = [ep.session for ep in endpoints if ep.session is not None]
        self.balancer.replace(())
        self._draining.clear()
        for session in sessions:
            await session.close()

    # -- calls ---------------------------------------------------------------------------------------------------

    def pick(self, avoid: Endpoint | None) -> Endpoint:
        """See Balancer.pick; the endpoint's session is open until its release(). Raises ResourceClosedError
        after aclose() (the set is never empty before)."""
        try:
            return self.balancer.pick(avoid)
        except LookupError as exc:
            raise ResourceClosedError(f"upstream {self.name} has no endpoint open") from exc

    @property
    def draining(self) -> list[Endpoint]:
        return list(self._draining)

    def release(self, endpoint: Endpoint, fault: bool | None) -> None:
        self.balancer.release(endpoint, fault)
        if endpoint.draining and endpoint.in_flight == 0:
            self._close(endpoint)

    def snapshot(self) -> list[EndpointView]:
        """Every endpoint, live or draining, with its state now (read-only: /debug and the scrape call it)."""
        now = self.balancer.clock()
        views: list[EndpointView] = []
        for ep in [*self.balancer.endpoints.values(), *self._draining]:
            until = ep.outlier.ejected_until
            ejected = until is not None and now < until and not ep.draining
            views.append(
                EndpointView(
                    endpoint=ep.key,
                    state="draining" if ep.draining else "ejected" if ejected else "active",
                    in_flight=ep.in_flight,
                    calls=ep.calls,
                    failures=ep.failures,
                    consecutive_failures=ep.outlier.consecutive,
                    ejections=ep.outlier.ejections,
                    ejected_for_s=round(until - now, 3) if ejected and until is not None else None,
                )
            )
        return views

    # -- where the endpoints come from -------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Resolve every name once and make the answers the live set; a failed lookup keeps that name's last
        answer. Endpoints no longer in it drain."""
        wanted: dict[str, Endpoint] = {}
        for origin in self._origins:
            addresses = await self._lookup(origin)
            if addresses is None:
                ep = self._endpoint(origin, origin.host, dialled_by_name=True)
                wanted.setdefault(ep.key, ep)
            for address in addresses or ():
                ep = self._endpoint(origin, address)
                wanted.setdefault(ep.key, ep)  # two names, one address: one endpoint
        if self._closed:
            return
        live = self.balancer.endpoints
        before = set(live)
        for key, ep in wanted.items():
            if key not in live:
                ep.session = self._new_session(self._cfg.max_concurrency)
        # Kept by key: an endpoint still wanted keeps its connections, counts and ejection.
        for ep in self.balancer.replace(wanted.values()):
            self._draining.add(ep)
            if ep.in_flight == 0:
                self._close(ep)
        added, removed = sorted(set(wanted) - before), sorted(before - set(wanted))
        if before and (added or removed):
            log.info(
                "upstream %s endpoints changed: +%s -%s", self.name, added, removed,
                extra={"event": "endpoints_changed", "upstream": self.name},
            )  # fmt: skip

    async def _lookup(self, origin: _Origin) -> list[str] | None:
        if is_address(origin.host):
            return [origin.host]
        if self._resolver is None:
            return None  # dialled by name: the connector resolves it, as for a single base_url
        try:
            async with asyncio.timeout(min(5.0, self._cfg.dns_refresh_s or 5.0)):
                addresses = (await self._resolver.resolve(origin.host, origin.port))[:MAX_ADDRESSES]
            if not addresses:
                raise OSError("no address")
        except (OSError, TimeoutError) as exc:
            if origin not in self._failing:
                self._failing.add(origin)
                log.warning(
                    "upstream %s: resolving %s failed (%s); keeping its last addresses", self.name, origin.host,
                    exc or type(exc).__name__, extra={"event": "dns_failed", "upstream": self.name},
                )  # fmt: skip
            return self._last.get(origin)
        self._failing.discard(origin)
        self._last[origin] = addresses
        return addresses

    def _endpoint(self, origin: _Origin, host: str, *, dialled_by_name: bool = False) -> Endpoint:
        named = self._service or origin
        shown = f"[{host}]" if ":" in host else host
        # An address dialled for a name, or endpoints standing in for a service: the service's name is sent and
        # checked, whatever is dialled.
        stand_in = self._service is not None or (not dialled_by_name and host != named.host)
        return Endpoint(
            key=f"{shown}:{origin.port}",
            prefix=f"{origin.scheme}://{shown}:{origin.port}",
            host_header=_authority(named.host, named.port, named.scheme) if stand_in else None,
            server_hostname=named.host if stand_in and origin.scheme == "https" else None,
        )

    # -- health ----------------------------------------------------------------------------------------------

    async def check_health(self) -> None:
        """GET the health path on every live endpoint once; each outcome counts as a call's would."""
        async with asyncio.TaskGroup() as group:
            for ep in list(self.balancer.endpoints.values()):
                group.create_task(self._probe(ep))

    async def _probe(self, ep: Endpoint) -> None:
        check = self._cfg.health_check
        if ep.session is None or ep.session.closed or check.path is None:
            return
        timeout = aiohttp.ClientTimeout(total=check.timeout_ms / 1000)
        headers = {"Host": ep.host_header} if ep.host_header else None
        healthy = False
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with ep.session.get(
                ep.prefix + check.path, headers=headers, timeout=timeout, allow_redirects=False, ssl=self._tls,
                server_hostname=ep.server_hostname,
            ) as resp:  # fmt: skip
                healthy = resp.status < 400
        if not ep.draining:
            self.balancer.record(ep, fault=not healthy)

    # -- internals ---------------------------------------------------------------------------------------------

    def _ejected(self, ep: Endpoint, for_s: float) -> None:
        log.warning(
            "upstream %s: endpoint %s ejected for %.1f s after %d failures in a row", self.name, ep.key, for_s,
            self._cfg.outlier.consecutive_failures, extra={"event": "endpoint_ejected", "upstream": self.name},
        )  # fmt: skip

    def _returned(self, ep: Endpoint) -> None:
        log.info(
            "upstream %s: endpoint %s back in rotation", self.name, ep.key,
            extra={"event": "endpoint_returned", "upstream": self.name},
        )  # fmt: skip

    def _close(self, ep: Endpoint) -> None:
        """A drained endpoint's connector closes, and with it every connection it holds."""
        self._draining.discard(ep)
        session, ep.session = ep.session, None
        if session is not None and not self._closed:
            task = asyncio.get_running_loop().create_task(session.close(), name=f"upstream-{self.name}-drain-close")
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _spawn(self, work: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=f"upstream-{self.name}-{what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _every(self, interval_s: float, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await work()
            except Exception:  # a bug here must not stop the refresh for good: logged, tried again next time
                log.exception("upstream %s: background %s failed", self.name, work.__name__)
