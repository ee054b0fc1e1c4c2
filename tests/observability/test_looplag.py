"""The loop-lag sampler's view of a stall, as the upstream client reads it when a timeout has just run out."""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop
from prometheus_client import CollectorRegistry, Histogram

from app.observability.looplag import LoopLagSampler

STALL_S = 0.5
INTERVAL_S = 0.01


def sampler() -> LoopLagSampler:
    histogram = Histogram("lag_seconds", "Loop lag.", registry=CollectorRegistry())
    return LoopLagSampler(histogram, interval_s=INTERVAL_S)


async def stall_as_seen_right_after_it() -> tuple[float, float, float]:
    lag = sampler()
    await lag.start()
    try:
        await asyncio.sleep(5 * INTERVAL_S)
        time.sleep(STALL_S)  # noqa: ASYNC251 -- the loop stands still: the subject of the test
        # First in line after the stall, before the sampler's own task has run: its sample is overdue.
        seen_at_once = lag.stall_within(STALL_S)
        deadline = time.monotonic() + 10
        while lag.worst_recent_s() < STALL_S * 0.8:  # the sampler has taken the late sample
            assert time.monotonic() < deadline, "the sampler never ran after the stall"
            await asyncio.sleep(INTERVAL_S)
        seen_later = lag.stall_within(10.0)
        # A window that ends after the stall and starts once the sampler has run again leaves it out.
        calm_from = time.perf_counter()
        await asyncio.sleep(5 * INTERVAL_S)
        seen_outside = lag.stall_within(time.perf_counter() - calm_from)
        return seen_at_once, seen_later, seen_outside
    finally:
        await lag.aclose()


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_a_stall_is_seen_before_and_after_the_sampler_runs(loop_factory: type) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        at_once, later, outside = runner.run(stall_as_seen_right_after_it())
    assert at_once >= STALL_S * 0.8
    assert later >= STALL_S * 0.8
    assert outside < STALL_S * 0.8


async def test_a_closed_sampler_reports_no_stall() -> None:
    lag = sampler()
    await lag.start()
    await lag.aclose()
    assert lag.stall_within(60.0) == 0.0


async def timer_woken_reads() -> tuple[float, float]:
    """A timer that expires during the stall, as a call's timeout does, scheduled to run before the sampler's own
    (earlier deadline): what it reads is the sample overdue at that moment. A window that began after most of the
    stall counts only its part of it."""
    lag = sampler()
    await lag.start()
    loop = asyncio.get_running_loop()
    read: dict[str, float] = {}
    try:
        await asyncio.sleep(5 * INTERVAL_S)
        began = time.perf_counter()
        loop.call_later(INTERVAL_S / 10, lambda: read.update(timer=lag.stall_within(time.perf_counter() - began)))
        time.sleep(STALL_S)  # noqa: ASYNC251 -- the loop stands still: the subject of the test
        loop.call_soon(lambda: read.update(late=lag.stall_within(0.1)))
        deadline = time.monotonic() + 10
        while len(read) < 2:
            assert time.monotonic() < deadline, "the callbacks never ran"
            await asyncio.sleep(INTERVAL_S)
    finally:
        await lag.aclose()
    return read["timer"], read["late"]


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"])
def test_a_timer_expired_in_the_stall_sees_it_and_a_late_window_sees_only_its_part(loop_factory: type) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        timer, late_window = runner.run(timer_woken_reads())
    assert timer >= STALL_S * 0.8
    # A window of the last 0.1 s, read just after the stall: at most that much of it, however long it was.
    assert late_window <= 0.1 + INTERVAL_S
