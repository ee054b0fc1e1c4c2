"""A client-side balancer, as kube-proxy behaves in miniature: it polls every instance's /readyz every 100 ms and
routes round-robin only to the instances that answered 200 at their last poll. An instance that starts draining
leaves the rotation within one poll interval, as an endpoint removal reaches a node some time after the pod
started terminating.

    async with Balancer() as lb:
        lb.add(url_a)
        await lb.wait_ready(url_a)
        target = lb.pick()          # a ready instance, or None
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp


@dataclass(frozen=True)
class Transition:
    at: float  # time.time() of the poll that saw the change
    url: str
    ready: bool
    status: int | None  # the /readyz status, None when no answer came
    report: str | None  # the body's "status" field ("ready", "draining", ...)


class Balancer:
    def __init__(self, *, poll_interval: float = 0.1, probe_timeout: float = 0.5) -> None:
        self.poll_interval = poll_interval
        self._probe_timeout = aiohttp.ClientTimeout(total=probe_timeout)
        self._ready: dict[str, bool] = {}
        self._pollers: dict[str, asyncio.Task[None]] = {}
        self._rotation = 0
        self._changed = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self.transitions: list[Transition] = []
        self.picks: dict[str, int] = {}

    async def __aenter__(self) -> Balancer:
        # A fresh connection per probe, as a prober does; never one of the client's pooled connections.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for url in list(self._pollers):
            await self.remove(url)
        if self._session is not None:
            await self._session.close()

    def add(self, url: str) -> None:
        """Start polling ``url``; it enters the rotation once a poll answers 200."""
        self._ready[url] = False
        self._pollers[url] = asyncio.create_task(self._poll(url), name=f"balancer-poll-{url}")

    async def remove(self, url: str) -> None:
        task = self._pollers.pop(url, None)
        self._ready.pop(url, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def ready_urls(self) -> list[str]:
        return [url for url, ready in self._ready.items() if ready]

    def pick(self) -> str | None:
        ready = self.ready_urls()
        if not ready:
            return None
        self._rotation += 1
        url = ready[self._rotation % len(ready)]
        self.picks[url] = self.picks.get(url, 0) + 1
        return url

    async def wait_ready(self, url: str, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        await self._wait(lambda: self._ready.get(url, False), timeout)

    async def wait_not_ready(self, url: str, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        await self._wait(lambda: not self._ready.get(url, False), timeout)

    def first_change(self, url: str, *, ready: bool) -> Transition | None:
        return next((t for t in self.transitions if t.url == url and t.ready is ready), None)

    async def _wait(self, condition: Callable[[], bool], limit: float) -> None:
        async with asyncio.timeout(limit):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    async def _poll(self, url: str) -> None:
        assert self._session is not None
        while True:
            status: int | None = None
            report: str | None = None
            try:
                async with self._session.get(f"{url}/readyz", timeout=self._probe_timeout) as resp:
                    status = resp.status
                    body = await resp.json(content_type=None)
                    report = body.get("status") if isinstance(body, dict) else None
            except (aiohttp.ClientError, TimeoutError, ValueError):
                pass
            ready = status == 200
            if url in self._ready and self._ready[url] != ready:
                self._ready[url] = ready
                self.transitions.append(Transition(time.time(), url, ready, status, report))
                self._changed.set()
            await asyncio.sleep(self.poll_interval)
