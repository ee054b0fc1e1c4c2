"""Programmable upstream HTTP servers for tests.

An `UpstreamServer` is a real aiohttp server on 127.0.0.1 that runs in its own thread with its own event
loop, so it serves an in-process gateway (whose loop is the test's) and a separate gateway process alike. A
test scripts it per path with a `Behavior` and reads back what arrived (`requests`, `count`, ...).

    with UpstreamServer("users") as users:
        users.set("/users/1", Behavior(statuses=[503, 503], latency=0.05))
        ...
        users.wait_for_requests(3)

The `wait_for_*` methods block the calling thread: from an async test whose own loop still has to send the
requests, use the `await_*` variants instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NoReturn

import orjson
from aiohttp import web
from multidict import CIMultiDict

Mode = Literal["normal", "hang", "reset", "slow_body", "garbage", "stream"]

HOST = "127.0.0.1"
DEFAULT_START_TIMEOUT = 10.0
DEFAULT_STOP_TIMEOUT = 10.0
# Handlers are cancelled before shutdown, so this only bounds a handler that ignores cancellation.
SHUTDOWN_TIMEOUT = 1.0
MAX_REQUEST_BODY = 64 * 1024 * 1024
GARBAGE = b"\x00\xff\xfeTHIS IS NOT HTTP\r\n\r\n"
STREAM_CHUNK = 64 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})


class Gate:
    """Holds answers back until the test opens it (from any thread): `Behavior(gate=gate)`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def wait(self) -> None:
        event = asyncio.Event()
        with self._lock:
            if self._open:
                return
            self._waiters.append((asyncio.get_running_loop(), event))
        await event.wait()

    def open(self) -> None:
        with self._lock:
            self._open = True
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
                loop.call_soon_threadsafe(event.set)


@dataclass
class Behavior:
    """How the server answers one path. `latency` delays the answer (for "slow_body": each byte)."""

    status: int = 200
    json: Any = None  # response body; None means {"path": <path>, "ok": true}
    latency: float = 0.0
    statuses: list[int] | None = None  # consumed one per request, then `status` answers
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None  # raw body; overrides `json`
    # hang: never answer, until the client goes away; reset: abort the TCP connection without a response;
    # slow_body: send the body one byte per `latency`; garbage: send `body` (or GARBAGE), which is not HTTP;
    # stream: the headers at once, then the body in chunks until the client goes away, chunked unless `headers`
    # declare a Content-Length. A large body then costs this server's thread nothing before the client has the
    # headers, and only what the client reads: "normal" hands the whole body to the transport first.
    mode: Mode = "normal"
    # The body (JSON) names these request headers' values: {"path": ..., "headers": {name: value or null}}.
    echo: tuple[str, ...] = ()
    gate: Gate | None = None  # answer only once it is open


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]  # first value of a repeated key; `query_string` has them all
    query_string: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    started: float  # time.monotonic()
    ended: float | None = None  # None while the handler still runs
    disconnected: bool = False  # the client went away before the answer was complete
    raw_path: str = ""  # as sent, percent-escapes and all (`path` is decoded)


@dataclass(slots=True)
class _Route:
    behavior: Behavior
    statuses: deque[int]


@dataclass(slots=True)
class _AsyncWaiter:
    ready: Callable[[], bool]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _forever() -> NoReturn:
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable")


class UpstreamServer:
    """A real aiohttp server on 127.0.0.1:<free port>, running in its own thread with its own event loop,
    so it works both for in-process app tests and for tests of a separate gateway process."""

    def __init__(
        self, name: str = "upstream", *, ssl_context: ssl.SSLContext | None = None, host: str = HOST, port: int = 0
    ) -> None:
        """``ssl_context``: serve HTTPS with it (its verify mode decides whether clients must show a certificate).
        ``host``, ``port``: where to listen (127.0.0.2, 127.0.0.3, ... are loopback too: several servers on one
        port, as the addresses of one name)."""
        self.name = name
        self.host = host
        self._want_port = port
        self._ssl_context = ssl_context
        self._cond = threading.Condition()
        self._routes: dict[str, _Route] = {}
        self._records: dict[int, RecordedRequest] = {}  # by arrival number, in arrival order
        self._next_seq = 0
        self._in_flight = 0
        self._peak = 0
        self._async_waiters: list[_AsyncWaiter] = []
        self._state: Literal["new", "running", "stopped"] = "new"
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._port: int | None = None
        # Owned by the server thread: set in _serve, touched only on its loop (stop() goes through
        # call_soon_threadsafe).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._handler_tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start serving; returns once the port is bound. Raises RuntimeError if already started, or if the
        server failed to start."""
        with self._cond:
            if self._state != "new":
                raise RuntimeError(f"upstream {self.name!r} was already started")
            self._state = "running"
        self._thread = threading.Thread(target=self._run, name=f"upstream-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(DEFAULT_START_TIMEOUT):
            raise TimeoutError(f"upstream {self.name!r} did not start within {DEFAULT_START_TIMEOUT}s")
        if self._error is not None:
            self._thread.join()
            with self._cond:
                self._state = "stopped"
            raise RuntimeError(f"upstream {self.name!r} failed to start") from self._error

    def stop(self) -> None:
        """Close the listener and all connections (in-flight handlers are cancelled) and join the thread.
        Idempotent. Raises TimeoutError if the thread does not finish, RuntimeError if the server crashed."""
        thread, loop, stop_event = self._thread, self._loop, self._stop_event
        if thread is threading.current_thread():
            raise RuntimeError("stop() called from the server's own thread: it would join itself")
        with self._cond:
            was_running = self._state == "running"
            self._state = "stopped"
        if not was_running:
            return
        if loop is not None and stop_event is not None and not loop.is_closed():
            # The loop may close between the check and this call if the server crashed: it is down already.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop_event.set)
        if thread is not None:
            thread.join(DEFAULT_STOP_TIMEOUT)
            if thread.is_alive():
                raise TimeoutError(f"upstream {self.name!r} did not stop within {DEFAULT_STOP_TIMEOUT}s")
        if self._error is not None:
            raise RuntimeError(f"upstream {self.name!r} crashed while serving") from self._error

    def __enter__(self) -> UpstreamServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"upstream {self.name!r} is not started")
        return self._port

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    # -- scripting -------------------------------------------------------------------------------------------

    def set(self, path: str, behavior: Behavior) -> None:
        """Answer requests for exactly `path` (no query) with `behavior`; other paths get Behavior()."""
        route = _Route(replace(behavior, headers=dict(behavior.headers)), deque(behavior.statuses or ()))
        with self._cond:
            self._routes[path] = route

    def _next_answer(self, path: str) -> tuple[Behavior, int]:
        with self._cond:
            route = self._routes.get(path)
            if route is None:
                return Behavior(), Behavior().status
            status = route.statuses.popleft() if route.statuses else route.behavior.status
            return route.behavior, status

    # -- stats -----------------------------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the recorded requests in arrival order (recorded once the body is read)."""
        with self._cond:
            return list(self._records.values())

    @property
    def peak_concurrency(self) -> int:
        with self._cond:
            return self._peak

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    def count(self, path: str | None = None) -> int:
        with self._cond:
            return sum(1 for r in self._records.values() if path is None or r.path == path)

    def _disconnects(self) -> int:
        return sum(1 for r in self._records.values() if r.disconnected)

    def reset_stats(self) -> None:
        """Forget recorded requests; handlers still running are no longer recorded when they end."""
        with self._cond:
            self._records.clear()
            self._peak = self._in_flight
            self._cond.notify_all()

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> None:
        """Block until at least `n` requests are recorded. Raises TimeoutError."""
        self._wait(lambda: len(self._records) >= n, timeout, f"{n} requests")

    def wait_for_disconnects(self, n: int, timeout: float = 5.0) -> None:
        """Block until at least `n` clients went away mid-request. Raises TimeoutError."""
        self._wait(lambda: self._disconnects() >= n, timeout, f"{n} disconnects")

    # A timeout parameter on an async method (ASYNC109) on purpose: it mirrors the blocking variants, and its
    # TimeoutError says how many requests did arrive, which a bare asyncio.timeout() around the call cannot.
    async def await_requests(self, n: int, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Like wait_for_requests, without blocking the caller's event loop."""
        await self._await(lambda: len(self._records) >= n, timeout, f"{n} requests")

    async def await_disconnects(self, n: int, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Like wait_for_disconnects, without blocking the caller's event loop."""
        await self._await(lambda: self._disconnects() >= n, timeout, f"{n} disconnects")

    def _timeout_error(self, what: str, timeout: float) -> TimeoutError:
        return TimeoutError(
            f"upstream {self.name!r}: no {what} within {timeout}s "
            f"({len(self._records)} requests, {self._disconnects()} disconnects recorded)"
        )

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(ready, timeout):
                raise self._timeout_error(what, timeout)

    async def _await(self, ready: Callable[[], bool], timeout: float, what: str) -> None:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        waiter = _AsyncWaiter(ready, loop, loop.create_future())
        with self._cond:
            if ready():
                return
            self._async_waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter.future
        except TimeoutError:
            with self._cond:
                raise self._timeout_error(what, timeout) from None
        finally:
            with self._cond:
                if waiter in self._async_waiters:
                    self._async_waiters.remove(waiter)

    def _notify(self) -> None:
        """Wake waiters; call with self._cond held."""
        self._cond.notify_all()
        for waiter in [w for w in self._async_waiters if w.ready()]:
            self._async_waiters.remove(waiter)
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting any more
                waiter.loop.call_soon_threadsafe(_resolve, waiter.future)

    # -- server thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # handed to start()/stop(): an exception in a thread would be lost
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        app = web.Application(client_max_size=MAX_REQUEST_BODY)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation (off by default since aiohttp 3.8.x) cancels the handler when the client's
        # connection is lost; that is how "hang" ends and how disconnects become observable.
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT)
        try:
            await runner.setup()
            site = web.TCPSite(runner, self.host, self._want_port, ssl_context=self._ssl_context)
            await site.start()
            self._port = runner.addresses[0][1]
            self._ready.set()
            await self._stop_event.wait()
            # Without this a "hang" handler would hold the shutdown for SHUTDOWN_TIMEOUT.
            for task in list(self._handler_tasks):
                task.cancel()
        finally:
            await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._handler_tasks.add(task)
        with self._cond:
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)
        seq: int | None = None
        disconnected = False
        try:
            body = await request.read()
            seq = self._record(request, body)
            behavior, status = self._next_answer(request.path)
            response, disconnected = await self._respond(request, behavior, status)
            return response
        except asyncio.CancelledError:
            # aiohttp cancels us once the client's connection is lost; stop() cancels with it still open.
            disconnected = _client_gone(request)
            raise
        finally:
            self._handler_tasks.discard(task)
            self._finish(seq, disconnected)

    def _record(self, request: web.Request, body: bytes) -> int:
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query={key: request.query[key] for key in request.query},
            query_string=request.query_string,
            headers=headers,
            body=body,
            started=time.monotonic(),
            raw_path=request.raw_path.partition("?")[0],
        )
        with self._cond:
            seq = self._next_seq
            self._next_seq += 1
            self._records[seq] = record
            self._notify()
        return seq

    def _finish(self, seq: int | None, disconnected: bool) -> None:
        with self._cond:
            self._in_flight -= 1
            record = self._records.get(seq) if seq is not None else None
            if seq is not None and record is not None:
                self._records[seq] = replace(record, ended=time.monotonic(), disconnected=disconnected)
            self._notify()

    async def _respond(self, request: web.Request, behavior: Behavior, status: int) -> tuple[web.StreamResponse, bool]:
        """The response, and whether the client went away before it was complete."""
        if behavior.latency > 0 and behavior.mode != "slow_body":
            await asyncio.sleep(behavior.latency)
        if behavior.gate is not None:
            await behavior.gate.wait()
        if behavior.mode == "hang":
            await _forever()
        if behavior.mode in ("reset", "garbage"):
            transport = request.transport
            if transport is not None:
                if behavior.mode == "reset":
                    transport.abort()
                else:
                    transport.write(behavior.body if behavior.body is not None else GARBAGE)
                    transport.close()
            # No await before returning: aiohttp's write of this response fails on the closed transport, which
            # it treats as a client disconnect, so no error is logged and we are not recorded as disconnected.
            return web.Response(), False

        payload = behavior.body
        if behavior.echo:
            echoed = {name: request.headers.get(name) for name in behavior.echo}
            payload = orjson.dumps({"path": request.path, "headers": echoed})
        if payload is None:
            payload = orjson.dumps(behavior.json if behavior.json is not None else {"path": request.path, "ok": True})
        headers = CIMultiDict(behavior.headers)
        headers.setdefault(
            "Content-Type", "application/octet-stream" if behavior.body is not None else "application/json"
        )
        if status in _NO_BODY_STATUSES or status < 200:
            return web.Response(status=status, headers=headers), False
        if behavior.mode == "normal":
            return web.Response(status=status, body=payload, headers=headers), False

        response = web.StreamResponse(status=status, headers=headers)
        if behavior.mode == "stream":
            return response, await _stream(request, response, payload)
        response.content_length = len(payload)
        try:
            await response.prepare(request)
            for i in range(len(payload)):
                if behavior.latency > 0:
                    await asyncio.sleep(behavior.latency)
                await response.write(payload[i : i + 1])
        except ConnectionError:
            return response, True
        return response, False


async def _stream(request: web.Request, response: web.StreamResponse, payload: bytes) -> bool:
    """Send ``payload`` in chunks without copying it; True if the client went away before its end."""
    if "Content-Length" not in response.headers:
        response.enable_chunked_encoding()
    view = memoryview(payload)
    try:
        await response.prepare(request)
        for start in range(0, len(view), STREAM_CHUNK):
            await response.write(view[start : start + STREAM_CHUNK])
        await response.write_eof()
    except ConnectionError:
        return True
    return False
