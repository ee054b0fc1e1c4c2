"""Single flight with real tasks: one call for many waiters, and no waiter able to cancel it for the others."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from app.upstream.cache.flight import FlightCancelledError, SingleFlight


class Call:
    """A call that runs until the test lets it finish, counting how often it was started and whether it was
    cancelled."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = False
        self.release = asyncio.Event()

    async def __call__(self) -> str:
        self.started += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return f"answer {self.started}"


async def until(predicate: Callable[[], bool]) -> None:
    """Let the loop run until ``predicate`` holds (a bounded number of turns)."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


async def test_many_waiters_share_one_call() -> None:
    flights: SingleFlight[str] = SingleFlight("u")
    call = Call()
    joined = [flights.join("k", call) for _ in range(50)]
    assert [leader for _, leader in joined] == [True] + [False] * 49
    waiting = [asyncio.create_task(flight.wait()) for flight, _ in joined]
    await until(lambda: flights.waiters == 50)
    call.release.set()
    assert await asyncio.gather(*waiting) == ["answer 1"] * 50
    assert call.started == 1
    assert len(flights) == 0  # forgotten once answered: the next caller starts a new call
    flight, leader = flights.join("k", call)
    assert leader
    assert await flight.wait() == "answer 2"


async def test_a_cancelled_waiter_leaves_the_call_to_the_others() -> None:
    flights: SingleFlight[str] = SingleFlight("u")
    call = Call()
    leader = asyncio.create_task(flights.join("k", call)[0].wait())
    other = asyncio.create_task(flights.join("k", call)[0].wait())
    await until(lambda: flights.waiters == 2 and call.started == 1)
    leader.cancel()  # the leader's client went away
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert flights.waiters == 1
    assert not call.cancelled
    call.release.set()
    assert await other == "answer 1"


async def test_the_call_is_cancelled_when_every_waiter_has_left() -> None:
    flights: SingleFlight[str] = SingleFlight("u")
    call = Call()
    waiters = [asyncio.create_task(flights.join("k", call)[0].wait()) for _ in range(3)]
    await until(lambda: call.started == 1 and flights.waiters == 3)
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    await until(lambda: call.cancelled and len(flights) == 0)


async def test_an_error_reaches_every_waiter() -> None:
    flights: SingleFlight[str] = SingleFlight("u")
    gate = asyncio.Event()

    async def failing() -> str:
        await gate.wait()
        raise ValueError("upstream broke")

    waiters = [asyncio.create_task(flights.join("k", failing)[0].wait()) for _ in range(3)]
    await until(lambda: flights.waiters == 3)
    gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert [type(r) for r in results] == [ValueError] * 3


async def test_a_caller_after_the_last_waiter_left_starts_a_call_of_its_own() -> None:
    flights: SingleFlight[str] = SingleFlight("u")
    call = Call()

    async def caller() -> str:
        flight, _ = flights.join("k", call)
        return await flight.wait()

    first = asyncio.create_task(caller())
    await asyncio.sleep(0)  # it has joined (and is waiting); the flight's own task has not run yet
    assert flights.waiters == 1
    assert call.started == 0
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    # The abandoned flight is being cancelled: a new caller must not join it (it would fail for nothing).
    flight, leader = flights.join("k", call)
    assert leader
    call.release.set()
    assert await flight.wait() == f"answer {call.started}"
    assert call.cancelled  # the abandoned call was cancelled, not left running


async def test_aclose_cancels_flights_and_tells_their_waiters() -> None:
    flights: SingleFlight[str] = SingleFlight("u")
    call = Call()
    waiter = asyncio.create_task(flights.join("k", call)[0].wait())
    await until(lambda: call.started == 1)
    await flights.aclose()
    with pytest.raises(FlightCancelledError):
        await waiter
    assert call.cancelled
