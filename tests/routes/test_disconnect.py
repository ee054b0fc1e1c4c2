"""The one disconnect watcher both long routes use (app/routes/disconnect.py): the protocol's signal, and the
portable watcher of receive() under other ASGI servers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from starlette.types import Message

from app.errors import ClientDisconnectedError
from app.routes.disconnect import until_disconnected
from app.security.protocol import DISCONNECT_EXTENSION


class Client:
    """The ASGI receive channel of a client whose body was read: it yields only a disconnect, when told to."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> Message:
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def test_the_work_result_comes_back_while_the_client_stays() -> None:
    client = Client()

    async def work() -> int:
        await asyncio.sleep(0)
        return 7

    assert await until_disconnected({}, client.receive, work()) == 7
    assert [t for t in asyncio.all_tasks() if t.get_name() == "disconnect-watcher"] == []


async def test_a_disconnect_cancels_the_work_and_is_raised() -> None:
    client = Client()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def leave() -> None:
        await started.wait()
        client.gone.set()

    leaving = asyncio.create_task(leave())
    with pytest.raises(ClientDisconnectedError, match="before the job finished"):
        await until_disconnected({}, client.receive, work(), what="the job finished")
    await leaving
    assert cancelled.is_set()
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    client = Client()
    started = asyncio.Event()

    async def work() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(until_disconnected({}, client.receive, work()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [t for t in asyncio.all_tasks() if t.get_name() == "disconnect-watcher"] == []


class Connection:
    """What the gateway's HTTP protocol offers a handler (app/security/protocol.py, watch_disconnect): a callback
    when the connection is lost, at once when it already is."""

    def __init__(self, *, lost: bool = False) -> None:
        self.lost = lost
        self.callback: Callable[[], None] | None = None

    def watch_disconnect(self, callback: Callable[[], None] | None) -> None:
        if callback is not None and self.lost:
            callback()
            return
        self.callback = callback

    def lose(self) -> None:
        self.lost = True
        if self.callback is not None:
            self.callback()

    def scope(self) -> dict[str, object]:
        return {"extensions": {DISCONNECT_EXTENSION: {"connection": self}}}


async def never_receive() -> Message:
    raise AssertionError("with the protocol's signal, nothing waits on receive()")


async def test_the_protocol_signal_cancels_the_work_without_a_watcher_task() -> None:
    connection = Connection()
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        started.set()
        assert [t for t in asyncio.all_tasks() if t.get_name() == "disconnect-watcher"] == []
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def leave() -> None:
        await started.wait()
        connection.lose()

    leaving = asyncio.create_task(leave())
    with pytest.raises(ClientDisconnectedError, match="before the aggregate finished"):
        await until_disconnected(connection.scope(), never_receive, work(), what="the aggregate finished")
    await leaving
    assert cancelled.is_set()
    assert connection.callback is None, "the handler stopped watching"
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_connection_already_lost_cancels_at_once() -> None:
    connection = Connection(lost=True)
    ran = False

    async def work() -> None:
        nonlocal ran
        await asyncio.sleep(0)
        ran = True

    with pytest.raises(ClientDisconnectedError):
        await until_disconnected(connection.scope(), never_receive, work())
    assert not ran


async def test_after_the_work_the_connection_is_no_longer_watched() -> None:
    connection = Connection()

    async def work() -> int:
        return 3

    assert await until_disconnected(connection.scope(), never_receive, work()) == 3
    assert connection.callback is None
    connection.lose()  # the next request's business, not this one's: nothing to cancel here
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
