"""The HTTP protocol the gateway serves with: uvicorn's httptools protocol, plus what must happen before a request
reaches the app: bounds on the request head while it is still arriving (its size and its time), and admission
(app/security/admission.py).

httptools keeps no limit of its own: it buffers a header of any length until its end arrives (50 MB were seen to
be taken whole), and the ASGI app only ever sees complete heads. Nor does uvicorn time a head: a client that
connects and sends nothing, or one byte a minute (slowloris), holds its connection for ever. So this protocol
counts the bytes of each head as they arrive and answers 431 past the bound, and answers 408 to a head not
complete within ``limits.request_head_timeout_s``; both close the connection. The finer limits (header count and
size, URL, query parameters; app/security/headers.py, checked by app/middleware/front.py) then apply to every
head that fits.

This subclasses uvicorn's httptools protocol and relies on its parser callbacks (on_message_begin,
on_headers_complete) and data_received; tests/security/test_limits.py fails if a uvicorn upgrade changes them. The
one private hook it needs (where a request starts) is isolated in app/security/uvicorn_hook.py.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Callable
from typing import cast

from starlette.types import ASGIApp, Scope
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from app.errors import HeadersTooLargeError, ProblemError, RequestTimeoutError
from app.problems import problem_json
from app.security.admission import Admission
from app.security.headers import SECURITY_HEADERS, head_problem
from app.security.uvicorn_hook import StartHook
from app.settings import LimitSettings

# Request line, ": " and CRLF per header, the blank line: what a head costs beyond its names, values and URL.
_HEAD_OVERHEAD = 1024
LINGER_S = 1.0
_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


LIVENESS_PATH = "/healthz"
# The scope extension under which a request's handler finds its connection (``{"connection": protocol}``), to be
# called back when it is lost (app/routes/disconnect.py): instead of a task per request waiting on receive().
DISCONNECT_EXTENSION = "gateway.disconnect"


def _canned(status_line: bytes, body: bytes) -> tuple[bytes, bytes]:
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), *SECURITY_HEADERS]
    return status_line + b"".join(b"%s: %s\r\n" % h for h in headers), body


_LIVENESS = _canned(b"HTTP/1.1 200 OK\r\n", b'{"status":"ok"}')
# Request ids of canned answers: a per-process random prefix and a counter, no system call per answer.
_ID_PREFIX = secrets.token_hex(8).encode()
_ids = itertools.count()


def _request_id() -> bytes:
    return b"%s%08x" % (_ID_PREFIX, next(_ids))


def max_head_bytes(limits: LimitSettings) -> int:
    return limits.max_header_bytes + limits.max_url_bytes + 4 * limits.max_headers + _HEAD_OVERHEAD


class GatewayProtocol(StartHook):
    max_head_bytes: int = 64 * 1024
    head_timeout_s: float = 10.0
    admission: Admission | None = None
    limits: LimitSettings | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._in_head: bool | None = True  # None once refused
        self._lost = False
        self._on_disconnect: Callable[[], None] | None = None
        self._head_bytes = 0
        # From the connection on: a client that connects and says nothing is timed too.
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._lost = True
        super().connection_lost(exc)
        callback, self._on_disconnect = self._on_disconnect, None
        if callback is not None:
            callback()

    def watch_disconnect(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` when the client goes away (at once if it already has); None stops watching.

        One request runs at a time on a connection (a pipelined one starts when the one before it has answered,
        by which time its handler has stopped watching), so one callback at a time is enough."""
        if callback is not None and self._lost:
            callback()
            return
        self._on_disconnect = callback

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        if self._head_timer is None:
            self._start_head_timer()  # the next request on a kept-alive connection
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def data_received(self, data: bytes) -> None:
        if self._in_head is None:
            return  # refused: what the client still sends is dropped unread until the connection closes
        super().data_received(data)
        # Still in the head after the parser took this chunk: all of it was head. (A chunk that also began the
        # next pipelined request is counted whole: an overcount by at most one read.)
        if self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse(HeadersTooLargeError(f"the request head exceeds {self.max_head_bytes} bytes"))

    def start_request(self, cycle: RequestResponseCycle, app: ASGIApp) -> None:
        # Called when a request may start (at once, or when the one before it on this connection is done).
        admission = self.admission
        path = cycle.scope["path"]
        if (
            path == LIVENESS_PATH
            and cycle.scope["method"] in ("GET", "HEAD")
            and (
                self.limits is None or head_problem(cast(Scope, cycle.scope), self.limits) is None
            )  # else the app refuses
        ):
            # Liveness is the event loop answering: in the turn that read the request, with no task to schedule,
            # so that a loop busy with a burst still answers its probe within one turn.
            self._answer(cycle, *_LIVENESS)
        elif admission is None or path in admission.exempt:
            cycle.scope["extensions"] = {DISCONNECT_EXTENSION: {"connection": self}}
            self.run_request(cycle, app)
        elif admission.admits(path):
            cycle.scope["extensions"] = {DISCONNECT_EXTENSION: {"connection": self}}
            # Counted in at once (a burst admits many in one turn, and each must see the others), out when the
            # request's task ends, however it ends.
            admission.enter()
            self.run_request(cycle, app, on_done=admission.leave)
        else:
            self._answer(cycle, *admission.shed())

    def _answer(self, cycle: RequestResponseCycle, head: bytes, body: bytes) -> None:
        closing = self.admission is not None and self.admission.closing()
        self.answer_now(cycle, [head, b"x-request-id: %s\r\n" % _request_id()], body, close=closing)

    def _start_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        # Between a response and the next request the connection is idle, which uvicorn's keep-alive timeout
        # governs; only a head begun, or none ever sent, is ours.
        if self._in_head and not self.transport.is_closing() and (self._head_bytes or self.cycle is None):
            self._refuse(RequestTimeoutError(f"the request head did not arrive within {self.head_timeout_s:g} s"))

    def _refuse(self, err: ProblemError) -> None:
        self._cancel_head_timer()
        body = problem_json(err)
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/problem+json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (err.status, _REASONS[err.status], len(body), body)
        )
        # A lingering close: closing with the client's bytes still unread would reset the connection, and the
        # client would never read the answer. Drop what still comes, for a moment, then close.
        self._in_head = None
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def gateway_protocol(limits: LimitSettings, admission: Admission | None) -> type[GatewayProtocol]:
    """The protocol class for uvicorn's ``http=`` setting, bound to these limits and this admission count."""
    attrs = {
        "max_head_bytes": max_head_bytes(limits),
        "head_timeout_s": limits.request_head_timeout_s,
        "admission": admission,
        "limits": limits,
    }
    return type("GatewayProtocol", (GatewayProtocol,), attrs)
