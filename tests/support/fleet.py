"""Several real upstream servers that are one service: the same port on 127.0.0.2, 127.0.0.3, ... (all loopback),
as the pods behind a headless Service; a DNS zone the test controls; and the upstream client on its own, opened
and closed as the lifespan does.

    with fleet(3) as servers:                     # servers[i].host == f"127.0.0.{i + 2}", one port
        zone = Zone({"users.test": [servers[0].host]})
        async with open_client(settings, resolver=zone) as client:
            ...
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator

from app.settings import Settings
from app.upstream.client import Outbound, Progress, Result, UpstreamClient
from app.upstream.paths import confine_path, join_url
from app.upstream.session import HttpSession
from tests.support.upstream import UpstreamServer

_BIND_TRIES = 5


@contextlib.contextmanager
def fleet(n: int, *, ssl_context: ssl.SSLContext | None = None) -> Iterator[list[UpstreamServer]]:
    """``n`` servers on one port, on 127.0.0.2 onwards. The first picks a free port; should another process hold
    it on a later address, the whole fleet starts again on a new one."""
    for attempt in range(_BIND_TRIES):
        servers: list[UpstreamServer] = []
        try:
            first = UpstreamServer("ep0", ssl_context=ssl_context, host="127.0.0.2")
            first.start()
            servers.append(first)
            for i in range(1, n):
                server = UpstreamServer(f"ep{i}", ssl_context=ssl_context, host=f"127.0.0.{i + 2}", port=first.port)
                server.start()
                servers.append(server)
        except RuntimeError:
            for server in servers:
                server.stop()
            if attempt == _BIND_TRIES - 1:
                raise
            continue
        try:
            yield servers
        finally:
            for server in servers:
                server.stop()
        return


class Zone:
    """A resolver (app.upstream.resolver.Resolver) answering from a table the test edits; it counts lookups."""

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = names
        self.lookups = 0

    async def resolve(self, host: str, port: int) -> list[str]:
        self.lookups += 1
        if host not in self.names:
            raise OSError(f"{host}: no such name")
        return list(self.names[host])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def open_client(
    settings: Settings, *, resolver: Zone | None = None, clock: Callable[[], float] = time.monotonic
) -> AsyncIterator[UpstreamClient]:
    http = HttpSession(settings.http)
    client = UpstreamClient(settings, http, resolver=resolver, clock=clock)
    try:
        await http.start()
        await client.start()
        yield client
    finally:
        await client.aclose()
        await http.aclose()


async def get(client: UpstreamClient, upstream: str, path: str, *, deadline_s: float = 5.0) -> Result:
    """One call as an aggregate's source makes it."""
    cfg = client.upstreams[upstream].config
    out = Outbound("GET", join_url(cfg.base_url, confine_path(path)))
    deadline = asyncio.get_running_loop().time() + deadline_s
    return await client.call(upstream, out, deadline=deadline, headers={}, progress=Progress())


async def until(condition: Callable[[], bool], *, within_s: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` on the loop (each poll lets it run) until it holds. Raises TimeoutError."""
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not hold within {within_s} s")
        await asyncio.sleep(0.01)
