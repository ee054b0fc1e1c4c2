"""Small concurrency helpers shared by the resource modules."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def run_in_own_thread(fn: Callable[[], T], *, name: str) -> T:
    """Run one blocking call (a pool shutdown, say) in a thread of its own and await it.

    Used for rare lifecycle calls that must not borrow a slot from a bounded executor (that executor may be the
    thing being shut down) and must not use the loop's default executor, which the gateway never relies on.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def deliver(result: T | None, exc: BaseException | None) -> None:
        if done.cancelled():
            return
        if exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:  # delivered to the awaiting coroutine, not lost in the thread
            loop.call_soon_threadsafe(deliver, None, exc)
        else:
            loop.call_soon_threadsafe(deliver, result, None)

    threading.Thread(target=target, name=name, daemon=True).start()
    # Shielded: a cancelled caller must not pretend the blocking call stopped; it runs to its end regardless.
    return await asyncio.shield(done)
