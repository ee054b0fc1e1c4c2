"""Host names to all their addresses, off the event loop: getaddrinfo blocks, so it runs in this module's own two
threads (never the loop's default executor), and a lookup that hangs holds a thread, not the loop."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from app.errors import ResourceClosedError

# Two: one lookup stuck on a dead name server leaves the other upstreams a thread.
DNS_THREADS = 2


class Resolver(Protocol):
    """A swap point: the system's resolver below; tests pass one whose answers they control."""

    async def resolve(self, host: str, port: int) -> list[str]:
        """Every address of ``host``, in the resolver's order, without duplicates. Raises OSError."""
        ...


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class SystemResolver:
    """getaddrinfo (so /etc/hosts, search domains and the cluster's DNS, as every other program sees them), in a
    bounded executor of its own. start()/aclose(); unusable after aclose()."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    async def start(self) -> None:
        if self._closed:
            raise ResourceClosedError("the resolver is closed")
        self._executor = ThreadPoolExecutor(max_workers=DNS_THREADS, thread_name_prefix="gateway-dns")

    async def aclose(self) -> None:
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is not None:
            # A lookup still running finishes in its thread and is dropped; nothing waits for it.
            executor.shutdown(wait=False, cancel_futures=True)

    async def resolve(self, host: str, port: int) -> list[str]:
        if is_address(host):
            return [host]
        if self._executor is None:
            raise ResourceClosedError("the resolver is not running")
        infos = await asyncio.get_running_loop().run_in_executor(
            self._executor, socket.getaddrinfo, host, port, socket.AF_UNSPEC, socket.SOCK_STREAM
        )
        addresses: list[str] = []
        for _family, _type, _proto, _name, sockaddr in infos:
            address = str(sockaddr[0])
            if address not in addresses:
                addresses.append(address)
        return addresses
