"""Which endpoint of an upstream takes the next call: power of two choices on least outstanding requests (the
policy Envoy and Finagle default to), or round robin; ejected and draining endpoints take none.

Everything here runs on the event loop and never awaits: a pick, its in-flight count and its release cannot
interleave with another call's. The endpoints' connections and their addresses' refresh are app/upstream/endpoints.py.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from yarl import URL

from app.upstream.ejection import OutlierDetector, OutlierState

if TYPE_CHECKING:
    import aiohttp

EndpointState = Literal["active", "ejected", "draining"]


@dataclass(eq=False, slots=True)
class Endpoint:
    """One address an upstream's calls may be sent to."""

    key: str  # "10.0.0.5:8080": shown in /debug, the logs and (when enabled) metric labels; never to clients
    prefix: str  # "http://10.0.0.5:8080": what is dialled
    # The service's own name where an address is dialled: sent as Host and checked in the TLS handshake (SNI and
    # certificate). None: the prefix's host is the name.
    host_header: str | None = None
    server_hostname: str | None = None
    # Its own connector, so that draining it closes exactly its connections (set by app/upstream/endpoints.py).
    session: aiohttp.ClientSession | None = field(default=None, repr=False)
    in_flight: int = 0
    calls: int = 0
    failures: int = 0
    draining: bool = False
    outlier: OutlierState = field(default_factory=OutlierState)

    def url_for(self, url: URL) -> URL:
        """``url`` (built on the upstream's base URL) sent to this endpoint instead."""
        return URL(self.prefix + url.raw_path_qs, encoded=True)

    @property
    def state(self) -> EndpointState:
        if self.draining:
            return "draining"
        return "ejected" if self.outlier.ejected_until is not None else "active"


class Balancer:
    """The live endpoints of one upstream, and the pick among those not ejected."""

    def __init__(
        self,
        policy: Literal["p2c", "round_robin"],
        detector: OutlierDetector,
        *,
        rng: random.Random | None = None,
        on_ejected: Callable[[Endpoint, float], None] | None = None,
        on_returned: Callable[[Endpoint], None] | None = None,
    ) -> None:
        self._p2c = policy == "p2c"
        self._detector = detector
        self._rng = rng or random.Random()
        self._on_ejected = on_ejected
        self._on_returned = on_returned
        self.endpoints: dict[str, Endpoint] = {}
        self._active: list[Endpoint] = []
        self._ejected: list[Endpoint] = []
        self._next_return = float("inf")
        self._turn = -1
        self.ejections = 0  # in all, whatever became of the endpoints since

    def clock(self) -> float:
        return self._detector.clock()

    def pick(self, avoid: Endpoint | None = None) -> Endpoint:
        """The endpoint for the next call, counted in flight: hand it back with release(). ``avoid``: the one a
        retry's previous attempt failed on, taken only when no other is active. Raises LookupError when the
        upstream has no endpoint at all (app/upstream/endpoints.py never lets that happen)."""
        if self._detector.clock() >= self._next_return:
            self.return_due()
        active = self._active
        n = len(active)
        if n == 0:
            raise LookupError("no endpoint")
        if n == 1:
            chosen = active[0]
        elif self._p2c:
            i = self._rng.randrange(n)
            j = self._rng.randrange(n - 1)
            a, b = active[i], active[j + 1 if j >= i else j]
            if a is avoid:
                chosen = b
            elif b is avoid:
                chosen = a
            else:  # a and b come in random order: a tie goes either way
                chosen = a if a.in_flight <= b.in_flight else b
        else:
            self._turn = (self._turn + 1) % n
            chosen = active[self._turn]
            if chosen is avoid:
                self._turn = (self._turn + 1) % n
                chosen = active[self._turn]
        chosen.in_flight += 1
        chosen.calls += 1
        return chosen

    def release(self, endpoint: Endpoint, fault: bool | None) -> None:
        """A call picked on ``endpoint`` is over: ``fault`` True for a connect error, a timeout or a 5xx, False for
        any answer that shows it healthy, None when there is no verdict (cancelled, or cut by the deadline)."""
        endpoint.in_flight -= 1
        if fault is not None:
            self.record(endpoint, fault)

    def record(self, endpoint: Endpoint, fault: bool) -> None:
        """An outcome seen on ``endpoint`` (a call's, or an active health check's)."""
        if not fault:
            self._detector.succeeded(endpoint.outlier)
            return
        endpoint.failures += 1
        if endpoint.draining or endpoint.key not in self.endpoints:
            return
        if self._detector.failed(endpoint.outlier, endpoints=len(self.endpoints), ejected=len(self._ejected)):
            self.ejections += 1
            self._rebuild()
            if self._on_ejected is not None:
                until = endpoint.outlier.ejected_until or 0.0
                self._on_ejected(endpoint, until - self._detector.clock())

    def replace(self, endpoints: Iterable[Endpoint]) -> list[Endpoint]:
        """Make ``endpoints`` the live set (those already live, by key, are kept with their state); returns the
        ones that left it, now draining: they take no new call, and their calls in flight finish."""
        fresh = {ep.key: self.endpoints.get(ep.key, ep) for ep in endpoints}
        gone = [ep for key, ep in self.endpoints.items() if key not in fresh]
        for ep in gone:
            ep.draining = True
        self.endpoints = fresh
        self._rebuild()
        return gone

    def return_due(self) -> None:
        """Bring back the ejected endpoints whose time is up (a pick does it too; /debug and the scrape call it)."""
        now = self._detector.clock()
        back = [ep for ep in self._ejected if self._detector.due(ep.outlier, now)]
        self._rebuild()
        if self._on_returned is not None:
            for ep in back:
                self._on_returned(ep)

    def _rebuild(self) -> None:
        live = list(self.endpoints.values())
        self._active = [ep for ep in live if ep.outlier.ejected_until is None]
        self._ejected = [ep for ep in live if ep.outlier.ejected_until is not None]
        self._next_return = min((ep.outlier.ejected_until or 0.0 for ep in self._ejected), default=float("inf"))
