"""Global admission: at most ``limit`` requests in the app at once; the rest are answered 503 + Retry-After at once.

Shedding at the door is what keeps a burst far beyond capacity from turning into a queue that times out. The door
is the HTTP protocol (app/security/protocol.py), not a middleware: a request shed there costs a parse and one
canned answer written straight to the socket, no task and no trip through the middleware stack, so that a burst
of thousands of connections leaves the event loop free to answer /healthz and the admitted requests. Probes and
metrics are exempt, so that an overloaded gateway still reports itself alive and measurable.

When asked to (``limits.shed_loop_lag_ms``; off by default), the limit follows the event loop. A fixed in-flight
limit does not see CPU saturation: with fast upstreams, a loop at 100 % of its core admits up to the limit, and
everything else, refusals and accepts included, waits behind that work. So each loop-lag sample
(app/observability/looplag.py) steers the limit: a sample over ``target_lag_s`` cuts it by a quarter, down to
``floor``, while at least half the limit is in use (else the limit is not what loads the loop); each run of five
samples under half the target raises it by an eighth, up to the configured limit. Fewer requests at once wait
less for the loop; the loop stays saturated at 3x overload either way (README, "Overload behaviour", has the
measured effect).
"""

from __future__ import annotations

import typing
from collections.abc import Callable

from app.errors import OverloadedError
from app.problems import problem_json
from app.security.headers import SECURITY_HEADERS

# Shed reasons (the `reason` label of gateway_http_requests_shed_total).
AT_LIMIT = "in_flight"  # the configured in-flight limit is reached
LOOP_SATURATED = "loop_lag"  # the limit, lowered by the loop's lag, is reached

DECREASE = 0.75
INCREASE = 0.125
CALM_SAMPLES = 5


class AdmissionObserver(typing.Protocol):
    def request_shed(self, reason: str) -> None: ...
    def limit_changed(self, limit: int) -> None: ...


class Admission:
    """The in-flight count of one server, shared by all its connections (all on one event loop: no lock)."""

    def __init__(
        self,
        *,
        limit: int,
        retry_after_s: int,
        exempt: frozenset[str],
        floor: int = 1,
        target_lag_s: float = 0.0,
        closing: Callable[[], bool] = lambda: False,
    ) -> None:
        """``target_lag_s`` 0 keeps the limit fixed at ``limit``; otherwise it moves between ``floor`` and it.
        ``closing``: true once the gateway drains (app/lifecycle/inflight.py): answers given in the protocol
        (shed 503s, /healthz) then close their connection too, as every answer from the app does, so keep-alive
        clients reconnect through the updated endpoints."""
        self.ceiling = self.limit = limit
        self.floor = max(1, min(floor, limit))
        self.target_lag_s = target_lag_s
        self._calm = 0  # lag samples in a row under half the target
        self.exempt = exempt
        self.in_flight = 0
        self.shed_total = 0
        self._observer: AdmissionObserver | None = None
        self.closing = closing
        # Rendered once: the shed path runs thousands of times a second in a burst and must stay cheap.
        self._answers = {
            AT_LIMIT: _render(OverloadedError(f"more than {limit} requests in flight", retry_after_s=retry_after_s)),
            LOOP_SATURATED: _render(
                OverloadedError("the gateway's event loop is saturated", retry_after_s=retry_after_s)
            ),
        }

    def observe(self, observer: AdmissionObserver) -> None:
        """Report every shed request and every change of the limit to ``observer`` (the metrics hook)."""
        self._observer = observer
        observer.limit_changed(self.limit)

    def admits(self, path: str) -> bool:
        return path in self.exempt or self.in_flight < self.limit

    def enter(self) -> None:
        """Count one request in, at the moment it is admitted (not when its task first runs: a burst admits many
        in one turn of the loop, and each must see the others)."""
        self.in_flight += 1

    def leave(self, _: object = None) -> None:
        self.in_flight -= 1

    def shed(self) -> tuple[bytes, bytes]:
        """Count one request shed; returns the status line with headers, and the body, of its answer."""
        reason = AT_LIMIT if self.limit >= self.ceiling else LOOP_SATURATED
        self.shed_total += 1
        if self._observer is not None:
            self._observer.request_shed(reason)
        return self._answers[reason]

    def adapt(self, lag_s: float) -> None:
        """One sample of the event loop's lag: lower the limit while the loop runs late, raise it back while the
        loop keeps up. Does nothing when adaptation is off (``target_lag_s`` 0)."""
        target = self.target_lag_s
        if target <= 0:
            return
        self._calm = self._calm + 1 if lag_s < target / 2 else 0
        if lag_s > target:
            if self.in_flight * 2 < self.limit:
                # The limit is not what lets work in (a collection, an exempt scrape, a blocking call): cutting it
                # would shed requests without relieving the loop.
                return
            limit = max(self.floor, int(self.limit * DECREASE))
        elif self._calm >= CALM_SAMPLES:
            # A saturated loop still has quiet moments: only a run of calm samples shows there is room again.
            self._calm = 0
            limit = min(self.ceiling, self.limit + max(1, int(self.limit * INCREASE)))
        else:
            return
        if limit != self.limit:
            self.limit = limit
            if self._observer is not None:
                self._observer.limit_changed(limit)

    def snapshot(self) -> dict[str, object]:
        """For /debug/pools."""
        return {
            "in_flight": self.in_flight,
            "limit": self.limit,
            "ceiling": self.ceiling,
            "floor": self.floor,
            "target_lag_ms": self.target_lag_s * 1000,
            "shed_total": self.shed_total,
        }


def _render(err: OverloadedError) -> tuple[bytes, bytes]:
    body = problem_json(err)
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(err.retry_after_s).encode()),
        *SECURITY_HEADERS,
    ]
    return b"HTTP/1.1 503 Service Unavailable\r\n" + b"".join(b"%s: %s\r\n" % h for h in headers), body
