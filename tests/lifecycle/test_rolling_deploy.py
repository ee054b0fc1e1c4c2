"""A rolling deploy in miniature: real gateway processes behind a balancer that, like kube-proxy, learns from
/readyz (every 100 ms) which instances to route to, while a client keeps a steady load on it. Zero failures."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from tests.support.balancer import Balancer
from tests.support.drill import MIX, write_config
from tests.support.load import Load
from tests.support.procs import ServeProcess, assert_stopped_cleanly, shm_segments, start_serve
from tests.support.upstream import Behavior, UpstreamServer

DELAY_S = 1.0  # well above the balancer's 100 ms poll: traffic has moved away before the listener closes
TIMEOUT_S = 5.0


@pytest.mark.timeout(90)
async def test_rolling_deploy_fails_no_request(tmp_path: Path, pg_dsn: str, upstream: UpstreamServer) -> None:
    upstream.set("/users/7", Behavior(latency=0.2, json={"id": 7}))
    config = write_config(tmp_path, upstream_url=upstream.url, delay=DELAY_S, timeout=TIMEOUT_S)
    env = {"GATEWAY_DATABASE_URL": pg_dsn}
    shm_before = shm_segments()
    instances: list[ServeProcess] = []

    async def start(lb: Balancer) -> ServeProcess:
        gw = start_serve(config, tmp_path, env=env)
        instances.append(gw)
        await gw.wait_ready()
        lb.add(gw.url)
        await lb.wait_ready(gw.url)
        return gw

    async def retire(lb: Balancer, gw: ServeProcess) -> None:
        gw.signal(signal.SIGTERM)
        code = await gw.wait_exit(timeout=DELAY_S + TIMEOUT_S + 2)
        assert code == 0, gw.stderr()
        await lb.remove(gw.url)

    try:
        async with Balancer(poll_interval=0.1) as lb:
            first, second = await asyncio.gather(start(lb), start(lb))
            async with Load(MIX, target=lb.pick, concurrency=8) as load:
                await load.wait_for(lambda: load.count("ok") >= 30)
                for old in (first, second):
                    new = await start(lb)
                    await load.wait_for(lambda new=new: sum(a.target == new.url for a in load.attempts) >= 10)
                    await retire(lb, old)
                served = len(load.attempts)
                await load.wait_for(lambda: len(load.attempts) >= served + 30)
            await asyncio.gather(*(retire(lb, gw) for gw in instances[2:]))
    finally:
        for gw in instances:
            gw.kill()

    assert [a for a in load.attempts if a.outcome != "ok"] == []
    per_instance = {gw.url: sum(a.target == gw.url for a in load.attempts) for gw in instances}
    assert all(count >= 10 for count in per_instance.values()), per_instance
    for gw in instances:
        assert gw.event("drain_finished") is not None
        assert_stopped_cleanly(gw, shm_before)
