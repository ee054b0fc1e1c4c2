"""The drain: what the gateway does between SIGTERM (or SIGINT) and exit.

    signal ──▶ not ready (/readyz 503, gateway_draining 1), responses carry `Connection: close`
           ──▶ drain_delay_s: keep accepting and serving while endpoint removal reaches every node
           ──▶ stop accepting (listener.py), then uvicorn closes the listener and idle connections
           ──▶ up to drain_timeout_s: in-flight requests finish; past it they are cancelled (503 problem)
           ──▶ the lifespan closes every resource in reverse order ──▶ exit 0, or 4 if anything was cancelled

A second signal cuts it short: no more delay, in-flight requests are cancelled at once, and the lifespan still
closes everything (child processes, shared memory). uvicorn's own force-exit is never used, because it skips the
lifespan's shutdown. A watchdog thread bounds the whole thing: past drain_delay + drain_timeout + BOUND_MARGIN_S
after the first signal it kills the children and exits, whatever is stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.concurrency import run_in_own_thread
from app.lifecycle.inflight import InFlight
from app.lifecycle.listener import ListeningSocket, refuse_new_connections
from app.settings import ServerSettings

if TYPE_CHECKING:
    from app.state import GatewayState

log = logging.getLogger("app.lifecycle")

# After new SYNs are dropped, how long the loop keeps accepting handshakes already under way (an RTT is enough)
# before uvicorn closes the listener.
LISTENER_SETTLE_S = 0.1
# The whole drain never takes longer than drain_delay + drain_timeout + 2 s: the watchdog fires 0.75 s before,
# which leaves time to kill the children and exit on a busy machine.
BOUND_MARGIN_S = 1.25
# After a second signal: at most this long to finish closing before the watchdog ends it.
CUT_SHORT_GRACE_S = 1.5


class Target(Protocol):
    """The server being drained (GatewayServer)."""

    started: bool
    should_exit: bool

    def listening_sockets(self) -> Sequence[ListeningSocket]: ...
    def gateway_state(self) -> GatewayState | None: ...


@dataclass(frozen=True)
class DrainReport:
    signals: list[str]
    cut_short: bool
    cancelled_requests: int
    cancelled_queries: int
    seconds: float | None  # from the first signal to now

    @property
    def forced(self) -> bool:
        return bool(self.cancelled_requests or self.cancelled_queries)


class Watchdog:
    """Calls ``expire`` (in its own thread) once the earliest armed deadline (time.monotonic) has passed."""

    def __init__(self, expire: Callable[[], None]) -> None:
        self._expire = expire
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self.fired = False

    def arm(self, deadline: float) -> None:
        with self._cond:
            if self._deadline is not None and self._deadline <= deadline:
                return
            self._deadline = deadline
            self._cond.notify()
            if self._thread is None:
                # Daemon: a process that finished in time just exits; the watchdog never delays that.
                self._thread = threading.Thread(target=self._run, name="drain-watchdog", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        with self._cond:
            while True:
                assert self._deadline is not None
                remaining = self._deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self.fired = True
        self._expire()


class Drain:
    def __init__(self, settings: ServerSettings, in_flight: InFlight, *, watchdog: Watchdog | None = None) -> None:
        self.delay_s = settings.drain_delay_s
        self.timeout_s = settings.drain_timeout_s
        self.in_flight = in_flight
        self._watchdog = watchdog
        self._target: Target | None = None
        self._cut_short = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._timed_out = False
        self.signals: list[int] = []
        self.first_signal_at: float | None = None  # time.monotonic()
        self.stopped_accepting_at: float | None = None
        self.cancelled_queries = 0

    def bind(self, target: Target) -> None:
        self._target = target

    @property
    def target(self) -> Target:
        if self._target is None:
            raise RuntimeError("the drain is not bound to a server")
        return self._target

    @property
    def draining(self) -> bool:
        return self.first_signal_at is not None or self.stopped_accepting_at is not None

    def on_signal(self, signum: int) -> None:
        """A SIGTERM or SIGINT arrived (called on the event loop)."""
        self.signals.append(signum)
        name = _signal_name(signum)
        if len(self.signals) == 1:
            self._begin(name)
        else:
            self._cut_drain_short(name)

    def on_started(self) -> None:
        """The server finished starting; a signal that came during start-up is applied to readiness now."""
        if self.draining:
            self._mark_not_ready()

    def _begin(self, name: str) -> None:
        self.first_signal_at = time.monotonic()
        if self._watchdog is not None:
            self._watchdog.arm(self.first_signal_at + self.delay_s + self.timeout_s + BOUND_MARGIN_S)
        self._mark_not_ready()
        self.in_flight.close_connections = True
        target = self.target
        if not target.started:
            # Never ready, so nothing routes here: no delay. uvicorn stops as soon as start-up completes.
            log.info("%s during start-up: stopping once start-up completes", name, extra={"event": "drain_started"})
            target.should_exit = True
            return
        log.info(
            "%s: draining; /readyz answers 503, serving on for %.1f s, then up to %.1f s for in-flight requests",
            name,
            self.delay_s,
            self.timeout_s,
            extra={
                "event": "drain_started",
                "signal": name,
                "drain_delay_s": self.delay_s,
                "drain_timeout_s": self.timeout_s,
                "in_flight": len(self.in_flight),
            },
        )
        self._task = asyncio.get_running_loop().create_task(self._delay_then_stop(), name="drain")

    async def _delay_then_stop(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.delay_s):
                await self._cut_short.wait()
        self.stop_accepting()
        if not self._cut_short.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LISTENER_SETTLE_S):
                    await self._cut_short.wait()
        self.target.should_exit = True

    def _cut_drain_short(self, name: str) -> None:
        first = not self._cut_short.is_set()
        self._cut_short.set()
        if self._watchdog is not None:
            self._watchdog.arm(time.monotonic() + CUT_SHORT_GRACE_S)
        if first:
            log.warning(
                "second signal (%s): cutting the drain short; cancelling %d in-flight request(s)",
                name,
                len(self.in_flight),
                extra={"event": "drain_cut_short", "signal": name, "in_flight": len(self.in_flight)},
            )
        target = self.target
        if not target.started:
            return  # start-up finishes (it is bounded) and is followed at once by the shutdown
        self.stop_accepting()
        loop = asyncio.get_running_loop()
        self.in_flight.cancel_at(loop.time())
        loop.call_soon(self._timeout_passed)
        target.should_exit = True

    def stop_accepting(self) -> None:
        """Drop new connection attempts and start the drain timeout. Idempotent; also runs on a stop without a
        signal (uvicorn's shutdown calls it first)."""
        if self.stopped_accepting_at is not None:
            return
        self.stopped_accepting_at = time.monotonic()
        target = self.target
        refuse_new_connections(target.listening_sockets())
        self._mark_not_ready()
        self.in_flight.close_connections = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (0.0 if self._cut_short.is_set() else self.timeout_s)
        self.in_flight.cancel_at(deadline)
        loop.call_at(deadline, self._timeout_passed)
        log.info(
            "stopped accepting connections; waiting up to %.1f s for %d in-flight request(s)",
            max(0.0, deadline - loop.time()),
            len(self.in_flight),
            extra={"event": "listener_closed", "in_flight": len(self.in_flight)},
        )

    def _timeout_passed(self) -> None:
        if self._timed_out:
            return
        self._timed_out = True
        if self.in_flight and not self._cut_short.is_set():
            log.warning(
                "drain timeout (%.1f s) passed: cancelling %d request(s) still in flight",
                self.timeout_s,
                len(self.in_flight),
                extra={"event": "drain_timeout", "in_flight": len(self.in_flight)},
            )
        # Queries whose requests are gone would otherwise hold the DB executor's close until their own timeout.
        self._cancel_queries()

    def _cancel_queries(self) -> None:
        state = self.target.gateway_state()
        db = state.db if state is not None else None
        if db is None:
            return

        # Taken in the turn the timeout passed, before the requests cancelled in this same turn have run: each of
        # them cancels its own query on the server too, and may be done before the thread below looks. A query
        # running now is cancelled by the drain either way, and counted once, here.
        running = db.running()
        if not running:
            return

        async def cancel() -> None:
            cancelled = await run_in_own_thread(lambda: db.cancel_running(running), name="db-cancel")
            self.cancelled_queries += cancelled
            if cancelled:
                log.warning(
                    "cancelled %d running database quer%s",
                    cancelled,
                    "y" if cancelled == 1 else "ies",
                    extra={"event": "queries_cancelled", "queries": cancelled},
                )

        task = asyncio.get_running_loop().create_task(cancel(), name="drain-cancel-queries")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _mark_not_ready(self) -> None:
        state = self.target.gateway_state()
        if state is not None:
            state.readiness.draining = True

    def report(self) -> DrainReport:
        return DrainReport(
            signals=[_signal_name(s) for s in self.signals],
            cut_short=self._cut_short.is_set(),
            cancelled_requests=self.in_flight.cancelled,
            cancelled_queries=self.cancelled_queries,
            seconds=None if self.first_signal_at is None else time.monotonic() - self.first_signal_at,
        )


class DrainCollector(Collector):
    """In-flight requests and drain cancellations, read at scrape time."""

    def __init__(self, drain: Drain) -> None:
        self._drain = drain

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "gateway_http_requests_in_flight", "HTTP requests being served now.", value=len(self._drain.in_flight)
        )
        yield CounterMetricFamily(
            "gateway_drain_cancelled_requests",
            "Requests cancelled because the drain timeout passed or a second signal cut the drain short.",
            value=self._drain.in_flight.cancelled,
        )


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
