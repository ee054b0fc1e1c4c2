"""Run the gateway under uvicorn, programmatically, with httptools and uvloop (or asyncio's own loop), and drain
it on SIGTERM/SIGINT.

uvicorn installs its signal handlers (``signal.signal``, main thread) before the lifespan starts and calls
``handle_exit``; GatewayServer hands each signal to the drain (drain.py) instead of stopping at once, and never
records it for uvicorn to re-raise after the shutdown, so the exit code is the gateway's own:

    0  stopped cleanly: every in-flight request finished within drain_timeout_s
    2  the configuration is invalid (the CLI)
    3  start-up failed
    4  the drain had to cancel work: requests past drain_timeout_s, or cut short by a second signal
    5  the drain overran its bound and the watchdog ended the process
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import sys
from collections.abc import Callable, Collection, Sequence
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from app.lifecycle import children
from app.lifecycle.drain import Drain, DrainCollector, Watchdog
from app.lifecycle.listener import ListeningSocket
from app.lifecycle.signals import EarlySignals
from app.main import Gateway, build_gateway
from app.security.protocol import gateway_protocol
from app.settings import Settings
from app.state import GatewayState

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

log = logging.getLogger("app.lifecycle")

EXIT_OK = 0
EXIT_STARTUP_FAILED = 3
EXIT_DRAIN_FORCED = 4
EXIT_WATCHDOG = 5

# uvicorn cancels the request tasks itself this long after the drain timeout: only a handler that ignores the
# cancellation the drain already delivered ever meets it.
UVICORN_BACKSTOP_S = 1


class GatewayServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        *,
        gateway: Gateway,
        drain: Drain,
        on_ready: Callable[[GatewayServer], None] | None = None,
        early: EarlySignals | None = None,
    ) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.drain = drain
        self._on_ready = on_ready
        self._early = early
        self._loop: asyncio.AbstractEventLoop | None = None
        self.received_signals: list[int] = []
        self.stopped_before_start = False
        drain.bind(self)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the main thread between two bytecodes of whatever the loop was doing: only hand the signal over.
        # Not recorded in uvicorn's _captured_signals: uvicorn re-raises those after the shutdown, which would make
        # every graceful stop exit 143.
        self.received_signals.append(sig)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.drain.on_signal, sig)

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        with self.capture_signals():
            # From here on uvicorn's handlers catch signals; anything before reached EarlySignals.
            early = self._early.take() if self._early is not None else []
            if early:
                self.stopped_before_start = True
                self.received_signals.extend(early)
                log.info("signal before start-up: not starting", extra={"event": "stopped_before_start"})
                return
            await self._serve(sockets)

    def add_ready_callback(self, callback: Callable[[GatewayServer], None]) -> None:
        previous = self._on_ready

        def both(server: GatewayServer) -> None:
            if previous is not None:
                previous(server)
            callback(server)

        self._on_ready = both

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        self.gateway.state.require_metrics().add_collector(DrainCollector(self.drain))
        self.drain.on_started()
        if self._on_ready is not None and not self.should_exit:
            self._on_ready(self)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Whatever stopped the server (the drain, max requests, a caller), the drain timeout applies.
        self.drain.stop_accepting()
        await super().shutdown(sockets)

    def listening_sockets(self) -> Sequence[ListeningSocket]:
        return [sock for server in getattr(self, "servers", []) for sock in server.sockets]

    def gateway_state(self) -> GatewayState:
        return self.gateway.state

    @property
    def bound_port(self) -> int | None:
        for sock in self.listening_sockets():
            port: int = sock.getsockname()[1]
            return port
        return None


def build_server(
    settings: Settings,
    *,
    on_ready: Callable[[GatewayServer], None] | None = None,
    tracer_provider: TracerProvider | None = None,
    watchdog: Watchdog | None = None,
    early: EarlySignals | None = None,
) -> GatewayServer:
    gateway = build_gateway(settings, tracer_provider=tracer_provider)
    drain = Drain(settings.server, gateway.state.in_flight, watchdog=watchdog)
    config = uvicorn.Config(
        gateway.app,
        host=settings.server.host,
        port=settings.server.port,
        loop=settings.server.loop,
        # httptools, with the request head bounded and admission decided before the app (app/security/protocol.py).
        http=gateway_protocol(settings.limits, gateway.state.admission),
        backlog=settings.limits.listen_backlog,
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_keep_alive=math.ceil(settings.server.keepalive_timeout_s),
        timeout_graceful_shutdown=math.ceil(settings.server.drain_timeout_s) + UVICORN_BACKSTOP_S,
    )
    return GatewayServer(config, gateway=gateway, drain=drain, on_ready=on_ready, early=early)


def serve(
    settings: Settings,
    *,
    on_ready: Callable[[GatewayServer], None] | None = None,
    early: EarlySignals | None = None,
    keep_children: Collection[int] = (),
) -> int:
    """Serve until SIGTERM/SIGINT, drain, and return the process exit code (see the module docstring).

    ``keep_children``: processes of the caller's (and their descendants) that outlive the gateway on purpose."""
    if early is None:
        early = EarlySignals().install()
    watchdog = Watchdog(_watchdog_expired)
    server = build_server(settings, on_ready=on_ready, watchdog=watchdog, early=early)
    drain = server.drain
    server.run()
    if watchdog.fired:
        # Killing the children may have released what was stuck; the watchdog still decides how this ends.
        return EXIT_WATCHDOG
    children.stop_leftover_children(keep=keep_children)
    if server.stopped_before_start:
        return EXIT_OK
    if not server.started:
        return EXIT_STARTUP_FAILED
    report = drain.report()
    code = EXIT_DRAIN_FORCED if report.forced else EXIT_OK
    log.log(
        logging.WARNING if report.forced else logging.INFO,
        "stopped: %d request(s) and %d quer%s cancelled by the drain; exit code %d",
        report.cancelled_requests,
        report.cancelled_queries,
        "y" if report.cancelled_queries == 1 else "ies",
        code,
        extra={
            "event": "drain_finished",
            "signals": report.signals,
            "cut_short": report.cut_short,
            "cancelled_requests": report.cancelled_requests,
            "cancelled_queries": report.cancelled_queries,
            "drain_seconds": None if report.seconds is None else round(report.seconds, 3),
            "exit_code": code,
        },
    )
    return code


def _watchdog_expired() -> None:
    log.critical(
        "the drain overran its bound; killing child processes and exiting now",
        extra={"event": "drain_overran", "exit_code": EXIT_WATCHDOG},
    )
    children.kill_children()
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(EXIT_WATCHDOG)
