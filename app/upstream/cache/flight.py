"""Single flight: identical concurrent calls share one upstream call.

The first caller of a key starts the call as a task of its own, owned by this object rather than by any caller's
request; every caller (the first included) then waits for it through ``asyncio.shield``. So:

- a waiter cancelled (its deadline, its client gone) leaves alone: the call goes on for the others;
- when the last waiter has left, the call is cancelled (its connection closed): nobody would read its answer,
  and no task outlives every request that wanted it;
- ``aclose`` cancels every call in flight; a waiter whose call was cancelled that way (and not itself) gets
  FlightCancelledError, which the layer reports as a failed source rather than a cancellation.

The key leaves the table inside the task, before its result is set: a caller arriving after that starts a new
call instead of joining one whose answer (or failure) is already decided.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from app.errors import ResourceClosedError

T = TypeVar("T")


class FlightCancelledError(ResourceClosedError):
    """The shared call was cancelled for a reason other than this waiter (the gateway is shutting down)."""


class Flight(Generic[T]):
    __slots__ = ("_forget", "task", "waiters")

    def __init__(self, task: asyncio.Task[T], forget: Callable[[Flight[T]], None]) -> None:
        self.task = task
        self.waiters = 0
        self._forget = forget

    async def wait(self) -> T:
        """The shared call's result, or its exception. Raises FlightCancelledError when the call was cancelled but
        this waiter was not; CancelledError when this waiter was."""
        self.waiters += 1
        try:
            return await asyncio.shield(self.task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self.task.cancelled() and (current is None or current.cancelling() == 0):
                raise FlightCancelledError("the shared upstream call was cancelled") from None
            raise
        finally:
            self.waiters -= 1
            if self.waiters == 0 and not self.task.done():
                # Out of the table at once: a caller arriving while the task is still being cancelled starts a
                # call of its own rather than join one that is going away.
                self._forget(self)
                self.task.cancel()


class SingleFlight(Generic[T]):
    def __init__(self, name: str) -> None:
        self._name = name
        self._flights: dict[str, Flight[T]] = {}
        self._closed = False

    def __len__(self) -> int:
        return len(self._flights)

    @property
    def waiters(self) -> int:
        """Callers waiting on a call in flight, its leader included."""
        return sum(flight.waiters for flight in self._flights.values())

    def join(self, key: str, start: Callable[[], Coroutine[Any, Any, T]]) -> tuple[Flight[T], bool]:
        """The flight for ``key`` and whether this caller leads it (``start()`` was called to make it). Nothing
        awaits between this and ``Flight.wait()``, so the flight cannot end unwaited. Raises ResourceClosedError
        after aclose()."""
        flight = self._flights.get(key)
        if flight is not None:
            return flight, False
        if self._closed:
            raise ResourceClosedError("single flight is closed")
        task = asyncio.get_running_loop().create_task(self._run(key, start), name=f"flight:{self._name}")
        flight = self._flights[key] = Flight(task, lambda gone: self._forget(key, gone))
        return flight, True

    async def _run(self, key: str, start: Callable[[], Coroutine[Any, Any, T]]) -> T:
        try:
            # Made here, not in join(): a flight cancelled before it ever runs leaves no coroutine unawaited.
            return await start()
        finally:
            flight = self._flights.get(key)
            if flight is not None and flight.task is asyncio.current_task():
                del self._flights[key]

    def _forget(self, key: str, flight: Flight[T]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]

    async def aclose(self) -> None:
        self._closed = True
        tasks = [flight.task for flight in self._flights.values()]
        self._flights.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
