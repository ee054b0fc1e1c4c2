"""Run the gateway under uvicorn, programmatically, with httptools and uvloop (or asyncio's own loop)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from app.main import create_app
from app.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

log = logging.getLogger("app.lifecycle")

EXIT_OK = 0
EXIT_STARTUP_FAILED = 3


class GatewayServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, *, on_ready: Callable[[GatewayServer], None] | None = None) -> None:
        super().__init__(config)
        self._on_ready = on_ready
        self.received_signals: list[int] = []

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in uvicorn's _captured_signals: uvicorn re-raises those after a clean shutdown, which would
        # make every graceful stop exit 143. The gateway decides its own exit code.
        self.received_signals.append(sig)
        if self.should_exit:
            self.force_exit = True  # a second SIGTERM or SIGINT: stop waiting
        else:
            self.should_exit = True

    def add_ready_callback(self, callback: Callable[[GatewayServer], None]) -> None:
        previous = self._on_ready

        def both(server: GatewayServer) -> None:
            if previous is not None:
                previous(server)
            callback(server)

        self._on_ready = both

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._on_ready is not None:
            self._on_ready(self)

    @property
    def bound_port(self) -> int | None:
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                port: int = sock.getsockname()[1]
                return port
        return None


def build_server(
    settings: Settings,
    *,
    on_ready: Callable[[GatewayServer], None] | None = None,
    tracer_provider: TracerProvider | None = None,
) -> GatewayServer:
    config = uvicorn.Config(
        create_app(settings, tracer_provider=tracer_provider),
        host=settings.server.host,
        port=settings.server.port,
        loop=settings.server.loop,
        http="httptools",
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_keep_alive=int(settings.server.keepalive_timeout_s),
        timeout_graceful_shutdown=max(1, int(settings.server.drain_timeout_s)),
    )
    return GatewayServer(config, on_ready=on_ready)


def serve(settings: Settings, *, on_ready: Callable[[GatewayServer], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT. Returns the process exit code."""
    server = build_server(settings, on_ready=on_ready)
    server.run()
    if not server.started:
        return EXIT_STARTUP_FAILED
    return EXIT_OK
