"""Cancel a request's work when its client goes away: one watcher for every route that does long work.

FastAPI does not cancel a handler whose client disconnected. Under the gateway's own HTTP protocol
(app/security/protocol.py), the connection calls back when it is lost, and the callback cancels the handler's task:
nothing waits per request. Under any other ASGI server (tests that run the app in process), the portable way:
once a route has read its body, the next ``receive()`` returns only when the client disconnects, and a watcher task
waits for that. Either way the work itself runs in the handler's task.

A disconnect is raised as ClientDisconnectedError (499), never returned as a sentinel: the one error-to-response
mapping (app/problems.py) then logs, counts and answers it the same way for every route, and no caller can forget to
check for it or mistake it for a result.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from starlette.types import Receive, Scope

from app.errors import ClientDisconnectedError
from app.security.protocol import DISCONNECT_EXTENSION

T = TypeVar("T")


class DisconnectSignal(Protocol):
    def watch_disconnect(self, callback: Callable[[], None] | None) -> None: ...


async def until_disconnected(
    scope: Scope, receive: Receive, work: Awaitable[T], *, what: str = "the answer was ready"
) -> T:
    """Await ``work`` unless the client goes away first; then cancel it (upstream calls close their connections,
    queries are cancelled on the server, a transform's worker is replaced) and raise ClientDisconnectedError.

    Call it only after the body has been read in full: ``receive`` then yields nothing but the disconnect.
    """
    current = asyncio.current_task()
    assert current is not None
    extension = scope.get("extensions", {}).get(DISCONNECT_EXTENSION)
    signal: DisconnectSignal | None = extension["connection"] if extension is not None else None
    disconnected = False

    def gone() -> None:
        nonlocal disconnected
        disconnected = True
        current.cancel()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone()

    watcher: asyncio.Task[None] | None = None
    if signal is not None:
        signal.watch_disconnect(gone)
    else:
        watcher = asyncio.create_task(watch(), name="disconnect-watcher")
    try:
        return await work
    except asyncio.CancelledError:
        # Cancelled by the disconnect, and by nothing else (the server's own cancellation, a drain timeout, stays
        # a cancellation): that cancellation is spent here and becomes the disconnect.
        if disconnected and current.uncancel() == 0:
            raise ClientDisconnectedError(f"the client disconnected before {what}") from None
        raise
    finally:
        if signal is not None:
            signal.watch_disconnect(None)
        elif watcher is not None and not watcher.done():
            watcher.cancel()
            # Wait for it to finish cancelling, so no task outlives the request.
            await asyncio.wait({watcher})
