"""The one place the gateway reaches into uvicorn's private surface.

uvicorn has no public hook for the moment a request may start (at once, or once the request before it on the same
connection is done: pipelining), yet that is where admission must be decided, before a task exists for it. Its
httptools protocol starts every request through one private method, ``_start_asgi_task(cycle, app)``, called from
``on_headers_complete`` and ``on_response_complete``. ``StartHook`` turns that into ``start_request``, a method
of ours, and gives the two things a subclass needs to answer without the app: ``run_request`` (uvicorn's own
start, with a callback when the request's task ends) and ``answer_now`` (a canned answer written to the socket,
the cycle marked done as uvicorn's own ``send`` would).

tests/security/test_uvicorn_hook.py fails loudly when a uvicorn release changes any of this; the behaviour built on
it (shedding, /healthz in the protocol, pipelining) is tested end to end in tests/security/test_admission.py.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable

from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle


def _nothing() -> None:
    return None


class StartHook(HttpToolsProtocol):
    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGIApp) -> None:  # type: ignore[override]
        self.start_request(cycle, app)

    def start_request(self, cycle: RequestResponseCycle, app: ASGIApp) -> None:
        """Called when a request may start. Subclasses decide: run_request() it, or answer_now()."""
        self.run_request(cycle, app)

    def run_request(
        self, cycle: RequestResponseCycle, app: ASGIApp, *, on_done: Callable[[object], None] | None = None
    ) -> None:
        """As uvicorn starts a request, plus ``on_done`` called when its task ends, however it ends."""
        context = contextvars.Context() if getattr(self.config, "reset_contextvars", False) else None
        task: asyncio.Task[None] = self.loop.create_task(cycle.run_asgi(app), context=context)  # type: ignore[arg-type]
        if on_done is not None:
            task.add_done_callback(on_done)
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def answer_now(self, cycle: RequestResponseCycle, head: list[bytes], body: bytes, *, close: bool) -> None:
        """Write a whole answer for ``cycle`` without the app. ``head``: the status line and header lines, each
        ending in CRLF (the server's default headers are added). ``close`` ends the connection after it."""
        # The cycle marked done as uvicorn's own send() would: a body still arriving is then dropped by on_body,
        # and the connection goes on to its next request.
        cycle.response_started = cycle.response_complete = True
        cycle.message_event.set()
        parts = [*head, *(b"%s: %s\r\n" % header for header in self.server_state.default_headers)]
        close = close or not cycle.keep_alive
        if close:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        if cycle.scope["method"] != "HEAD":
            parts.append(body)
        self.transport.write(b"".join(parts))
        if close:
            self.transport.close()
        # As uvicorn's run_asgi does when a request ends: the cycle's hook back to this protocol is a reference
        # cycle that only the garbage collector would break, and in a burst its pauses stall the loop.
        cycle.on_response = _nothing
        self.on_response_complete()
