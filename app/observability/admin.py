"""The admin listener: /metrics (and operator endpoints) on a port of their own, off the public listener.

It is a second uvicorn server on the same event loop, opened by the lifespan and closed last-but-first, after the
public listener has drained, so metrics stay scrapeable through the whole drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Generator

import uvicorn
from fastapi import FastAPI

from app import problems
from app.errors import StartupError
from app.routes import debug, metrics

START_TIMEOUT_S = 10.0


def create_admin_app(gateway_state: object) -> FastAPI:
    app = FastAPI(title="gateway admin", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.gateway = gateway_state
    problems.install(app)
    app.include_router(metrics.router)
    app.include_router(debug.router)
    return app


class _NoSignalServer(uvicorn.Server):
    # The public server owns SIGTERM/SIGINT; a second one capturing them would steal the drain signal.
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class AdminListener:
    def __init__(self, app: FastAPI, *, host: str, port: int) -> None:
        self._host = host
        self._port = port
        config = uvicorn.Config(app, host=host, port=port, lifespan="off", log_config=None, access_log=False)
        self._server = _NoSignalServer(config)
        self._task: asyncio.Task[None] | None = None
        self.port: int | None = None

    async def start(self) -> None:
        """Raises StartupError when the port cannot be bound."""
        # Bound here rather than by uvicorn, which answers a bind failure with sys.exit() inside the loop.
        try:
            sock = socket.create_server((self._host, self._port), reuse_port=False)
        except OSError as exc:
            raise StartupError(f"admin listener cannot bind {self._host}:{self._port}: {exc.strerror}") from exc
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="admin-listener")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        while not self._server.started:
            if self._task.done() or loop.time() > deadline:
                raise StartupError("the admin listener could not start (is its port free?)")
            await asyncio.sleep(0.01)

    async def aclose(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(SystemExit, OSError):
            await self._task
