"""The guard against a blocked event loop (tests/support/blocking.py) fails a test that blocks a gateway's loop,
names the code that held it, and lets a test marked blocks_loop pass."""

from __future__ import annotations

import pytest

from tests.support.blocking import LIMIT_MS

INNER = f"""
import asyncio
import time

import pytest

from tests.support.gateway import make_settings, running_gateway


def hold_the_loop():
    time.sleep({LIMIT_MS / 1000 * 1.5})  # past the limit and past the detector's next look


async def test_that_blocks_the_loop():
    async with running_gateway(make_settings()):
        hold_the_loop()


@pytest.mark.blocks_loop
async def test_that_blocks_the_loop_on_purpose():
    async with running_gateway(make_settings()):
        hold_the_loop()


async def test_that_only_waits():
    async with running_gateway(make_settings()):
        await asyncio.sleep({LIMIT_MS / 1000 * 1.5})
"""

CONFTEST = """
from tests.support.blocking import loop_never_blocked  # noqa: F401
"""


# The inner run's stalls reach this test's own guard too (one logger): this test blocks loops on purpose.
@pytest.mark.blocks_loop
@pytest.mark.slow
def test_a_test_that_blocks_a_gateways_loop_fails(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner=INNER)
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "markers =\n    blocks_loop: on purpose\n"
    )
    result = pytester.runpytest_inprocess("-p", "no:randomly", "--strict-markers")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_that_blocks_the_loop*",
            "*event loop was blocked for 1000 ms or longer during this test*",
            "*in-process gateway: event loop blocked for * ms in hold_the_loop*",
        ]
    )
