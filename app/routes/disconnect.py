"""Cancel a request's work when its client goes away: one watcher for every route that does long work.

FastAPI does not cancel a handler whose client disconnected. Once a route has read its body, the next ASGI
``receive()`` returns only when the client disconnects; a watcher task waits for that and cancels the handler's
task. The work itself runs in the handler's task (no extra task per request).

A disconnect is raised as ClientDisconnectedError (499), never returned as a sentinel: the one error-to-response
mapping (app/problems.py) then logs, counts and answers it the same way for every route, and no caller can forget to
check for it or mistake it for a result.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive

from app.errors import ClientDisconnectedError

T = TypeVar("T")


async def until_disconnected(receive: Receive, work: Awaitable[T], *, what: str = "the answer was ready") -> T:
    """Await ``work`` unless the client goes away first; then cancel it (upstream calls close their connections,
    queries are cancelled on the server, a transform's worker is replaced) and raise ClientDisconnectedError.

    Call it only after the body has been read in full: ``receive`` then yields nothing but the disconnect.
    """
    current = asyncio.current_task()
    assert current is not None
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        while (await receive())["type"] != "http.disconnect":
            pass
        disconnected = True
        current.cancel()

    watcher = asyncio.create_task(watch(), name="disconnect-watcher")
    try:
        return await work
    except asyncio.CancelledError:
        # Cancelled by the watcher, and by nothing else (the server's own cancellation, a drain timeout, stays
        # a cancellation): that cancellation is spent here and becomes the disconnect.
        if disconnected and current.uncancel() == 0:
            raise ClientDisconnectedError(f"the client disconnected before {what}") from None
        raise
    finally:
        if not watcher.done():
            watcher.cancel()
            # Wait for it to finish cancelling, so no task outlives the request.
            await asyncio.wait({watcher})
