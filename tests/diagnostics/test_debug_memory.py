"""/debug/memory reports the shared memory the CPU pool holds (it once read a field the pool's stats lack, and
always said 0)."""

from __future__ import annotations

import aiohttp

from app.worker import shm
from tests.compute.helpers import compute_settings, shm_guard  # noqa: F401  (fixture)
from tests.support.gateway import running_gateway

SEGMENT_BYTES = 3 * 1024 * 1024


async def test_memory_reports_the_segments_the_pool_holds(shm_guard: None) -> None:  # noqa: F811
    settings = compute_settings(workers=1, load_plugins=False)
    settings = settings.model_copy(
        update={"observability": settings.observability.model_copy(update={"admin_port": 0})}
    )
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as client:
        admin = f"http://127.0.0.1:{gw.state.admin_port}"
        pool = gw.state.require_cpu()
        with shm.Segment(pool.namer.next(), SEGMENT_BYTES) as segment:
            segment.reserve()
            async with client.get(f"{admin}/debug/memory") as resp:
                held = (await resp.json())["shm_bytes"]
        async with client.get(f"{admin}/debug/memory") as resp:
            after = (await resp.json())["shm_bytes"]
    assert held == SEGMENT_BYTES
    assert after == 0
