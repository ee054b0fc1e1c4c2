"""A load client: fixed concurrency, every request recorded.

Each of ``concurrency`` workers sends one request after another (a closed loop) through one shared aiohttp session
with keep-alive, as a real client or proxy does. Every request is recorded with when it began, how it ended, and
whether its connection was refused before anything was sent: the one failure a correctly draining server may
cause, since such a request never reached it.

    calls = [Call("agg", "POST", "/aggregate", json={...}, check=lambda body: body["complete"])]
    async with Load(calls, target=url, concurrency=8) as load:
        await load.wait_for(lambda: load.count("ok") >= 20)
        ...
    assert load.failures() == []
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import orjson

# ok: a complete 2xx whose body passed the check. refused: the connection was refused, nothing was sent.
# bad_status / bad_body: a complete answer that is not a success. failed: sent (or possibly sent) and no complete
# answer: reset, disconnected, timed out. no_target: the target chooser had nowhere to send it.
Outcome = Literal["ok", "refused", "bad_status", "bad_body", "failed", "no_target"]


@dataclass(frozen=True)
class Call:
    label: str
    method: str
    path: str
    json: Any = None
    check: Callable[[Any], bool] | None = None  # on the parsed JSON body of a 2xx answer


@dataclass(frozen=True)
class Attempt:
    label: str
    target: str | None
    worker: int
    started: float  # time.time(), before the connection is chosen or opened
    ended: float
    outcome: Outcome
    status: int | None = None
    error: str | None = None
    connection_close: bool = False  # the answer said `Connection: close`
    body: Any = None  # parsed JSON of a non-2xx answer, for the test to inspect


class Load:
    def __init__(
        self,
        calls: Sequence[Call],
        *,
        target: str | Callable[[], str | None],
        concurrency: int,
        timeout: float = 15.0,
        connect_timeout: float = 5.0,
        think_s: float = 0.0,
        refused_backoff_s: float = 0.02,
    ) -> None:
        if not calls:
            raise ValueError("no calls")
        self.calls = list(calls)
        self._target = target
        self.concurrency = concurrency
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self._think_s = think_s
        self._refused_backoff_s = refused_backoff_s
        self.attempts: list[Attempt] = []
        self._changed = asyncio.Event()
        self._stopping = False
        self._session: aiohttp.ClientSession | None = None
        self._workers: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        connector = aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=0)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        self._workers = [asyncio.create_task(self._worker(i), name=f"load-worker-{i}") for i in range(self.concurrency)]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self, grace: float = 15.0) -> None:
        """Let every worker finish the request it is sending, then close the session."""
        self._stopping = True
        if self._workers:
            _, pending = await asyncio.wait(self._workers, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            self._workers = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- results --------------------------------------------------------------------------------------------

    def count(self, outcome: Outcome | None = None, label: str | None = None) -> int:
        return sum(
            1
            for a in self.attempts
            if (outcome is None or a.outcome == outcome) and (label is None or a.label == label)
        )

    def failures(self) -> list[Attempt]:
        """Attempts that were sent and did not end in a complete, successful answer."""
        return [a for a in self.attempts if a.outcome not in ("ok", "refused")]

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 15.0) -> None:  # noqa: ASYNC109
        """Wait until ``condition()`` holds, re-checked after every recorded attempt."""
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    # -- the workers ----------------------------------------------------------------------------------------

    def _pick(self) -> str | None:
        return self._target if isinstance(self._target, str) else self._target()

    async def _worker(self, index: int) -> None:
        n = 0
        while not self._stopping:
            call = self.calls[(index + n) % len(self.calls)]
            n += 1
            attempt = await self._one(index, call)
            self.attempts.append(attempt)
            self._changed.set()
            if attempt.outcome in ("refused", "no_target"):
                await asyncio.sleep(self._refused_backoff_s)  # nowhere to send it: do not spin
            elif self._think_s:
                await asyncio.sleep(self._think_s)

    async def _one(self, worker: int, call: Call) -> Attempt:
        assert self._session is not None
        target = self._pick()
        started = time.time()
        if target is None:
            return Attempt(call.label, None, worker, started, time.time(), "no_target")
        try:
            async with self._session.request(call.method, target + call.path, json=call.json) as resp:
                raw = await resp.read()
                close = resp.headers.get("Connection", "").lower() == "close"
                status = resp.status
        except aiohttp.ClientConnectorError as exc:
            refused = exc.os_error.errno == errno.ECONNREFUSED
            return Attempt(
                call.label,
                target,
                worker,
                started,
                time.time(),
                "refused" if refused else "failed",
                error=f"{type(exc).__name__}: {exc}",
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Attempt(call.label, target, worker, started, time.time(), "failed", error=f"{type(exc).__name__}")
        ended = time.time()
        body: Any = None
        with contextlib.suppress(orjson.JSONDecodeError):
            body = orjson.loads(raw) if raw else None
        if not 200 <= status < 300:
            return Attempt(call.label, target, worker, started, ended, "bad_status", status, None, close, body)
        if call.check is not None:
            try:
                good = call.check(body)
            except (KeyError, TypeError, IndexError, ValueError):
                good = False
            if not good:
                return Attempt(call.label, target, worker, started, ended, "bad_body", status, None, close, body)
        return Attempt(call.label, target, worker, started, ended, "ok", status, None, close)
