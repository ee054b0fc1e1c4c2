"""The one disconnect watcher both long routes use (app/routes/disconnect.py)."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Message

from app.errors import ClientDisconnectedError
from app.routes.disconnect import until_disconnected


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

    assert await until_disconnected(client.receive, work()) == 7
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
        await until_disconnected(client.receive, work(), what="the job finished")
    await leaving
    assert cancelled.is_set()
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    client = Client()
    started = asyncio.Event()

    async def work() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(until_disconnected(client.receive, work()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [t for t in asyncio.all_tasks() if t.get_name() == "disconnect-watcher"] == []
