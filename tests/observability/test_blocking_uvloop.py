"""The blocking-call detector under uvloop, where asyncio's debug mode and Handle._run patches see nothing."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import uvloop

from tests.support.gateway import make_settings, running_gateway


def a_blocking_call_under_uvloop() -> None:
    time.sleep(0.3)


async def block_once_inside_a_running_gateway() -> None:
    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    async with running_gateway(make_settings(observability={"blocking_threshold_ms": 100})):
        await asyncio.sleep(0.05)
        a_blocking_call_under_uvloop()
        await asyncio.sleep(0.05)


def test_detector_names_the_blocking_function_under_uvloop(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="app.observability.blocking")
    # The gateway's own loop in production; run directly rather than through pytest-asyncio's asyncio loop.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(block_once_inside_a_running_gateway())
    (warning,) = [r for r in caplog.records if getattr(r, "event", None) == "loop_blocked"]
    assert warning.function == "a_blocking_call_under_uvloop"  # type: ignore[attr-defined]
