"""Process-pool faults against a real `gateway serve`: a worker SIGKILLed in the middle of a job, and a /dev/shm
too small for a shared-memory payload (a real tmpfs of 1 MiB, mounted in a mount namespace of the gateway's own).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.faults.support import config, pool_workers, serve, toml
from tests.security.conftest import metric
from tests.support.gateway import GatewayProcess, wait_http_ok
from tests.support.net import free_port

ELEMENTS = 400_000  # 3.2 MB as float64: well past any shared-memory threshold, a few tens of ms per job
LONG_JOB = orjson.dumps({"data": [50_000_000]})  # prime_count's sieve up to its limit: seconds of pure Python
COMPUTE = {"enabled": True, "workers": 1, "queue_limit": 64, "job_timeout_s": 30}
SERVER = {"drain_timeout_s": 1}
LIMITS = {"max_body_bytes": 32 * 1024 * 1024}


def payload(n: int = ELEMENTS) -> bytes:
    return orjson.dumps({"data": [float(i % 97) / 7 for i in range(n)]})


async def transform(
    client: aiohttp.ClientSession, gw: GatewayProcess, body: bytes, name: str = "trig_log"
) -> tuple[int, Any, dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    async with client.post(f"{gw.url}/transform/{name}", data=io.BytesIO(body), headers=headers) as resp:
        return resp.status, await resp.json(content_type=None), dict(resp.headers)


async def scrape(client: aiohttp.ClientSession, gw: GatewayProcess) -> str:
    async with client.get(f"{gw.url}/metrics") as resp:
        return await resp.text()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    # The tests check the log themselves: a teardown failure would not be the expected failure it may be.
    with serve(tmp_path, config(compute=COMPUTE, limits=LIMITS, server=SERVER), check_log=False) as gw:
        yield gw


async def test_worker_killed_mid_job(gateway: GatewayProcess) -> None:
    # Client sees: the request whose job was running in the killed worker gets 503 + Retry-After (a problem,
    # never a 500); the requests queued behind it are served (200); the pool replaces the worker, and the next
    # request is served by the new one.
    async with aiohttp.ClientSession() as client:
        assert (await transform(client, gateway, payload(10)))[0] == 200
        (victim,) = pool_workers(gateway)
        # One job that needs seconds of CPU (a pure-Python sieve), alone in the pool: once the worker has spent
        # 0.1 s of CPU after it, that job is running in it, and far from done.
        cpu_before = sum(victim.cpu_times()[:2])
        doomed = asyncio.create_task(transform(client, gateway, LONG_JOB, "prime_count"))
        deadline = time.monotonic() + 10
        while sum(victim.cpu_times()[:2]) - cpu_before < 0.1:
            assert time.monotonic() < deadline, "the worker never started the long job"
            assert not doomed.done(), doomed.result()
            await asyncio.sleep(0.01)
        queued = [asyncio.create_task(transform(client, gateway, payload())) for _ in range(4)]
        while metric(await scrape(client, gateway), "gateway_cpu_pool_queued") < len(queued):
            assert time.monotonic() < deadline, "the short jobs never queued behind the long one"
            await asyncio.sleep(0.01)
        assert not doomed.done(), "the long job finished before the kill: make it longer"
        victim.send_signal(signal.SIGKILL)
        # Bounded: a pool that loses the job of a dead worker would leave its request waiting for ever.
        status, problem, headers = await asyncio.wait_for(doomed, timeout=10)
        assert status == 503, (status, problem)
        assert headers["Content-Type"] == "application/problem+json"
        assert problem["type"].startswith("urn:gateway:problem:")
        assert int(headers["Retry-After"]) >= 1
        answers = await asyncio.wait_for(asyncio.gather(*queued), timeout=10)
        assert [s for s, _, _ in answers] == [200] * len(queued), [(s, p) for s, p, _ in answers if s != 200]
        status, result, _ = await transform(client, gateway, payload(10))
        assert status == 200
        assert len(result["result"]) == 10
        (replacement,) = pool_workers(gateway)
        assert replacement.pid != victim.pid
        text = await scrape(client, gateway)
    assert metric(text, "gateway_cpu_pool_worker_restarts_total") >= 1
    assert "Traceback" not in gateway.stderr()


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /dev/shm"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return probe.returncode == 0


@contextlib.contextmanager
def serve_with_small_shm(tmp_path: Path, data: dict[str, Any], size: str) -> Iterator[GatewayProcess]:
    """`gateway serve` in a mount namespace of its own, whose /dev/shm is a fresh tmpfs of ``size``."""
    path = tmp_path / "gateway.toml"
    path.write_text(toml(data))
    port = free_port()
    stderr_path = tmp_path / "gateway.stderr"
    script = f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$@"'
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
    cmd += [sys.executable, "-m", "app", "serve", "--config", str(path), "--port", str(port)]
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "GATEWAY_AUTH__ENABLED": "false"}
        )
    gw = GatewayProcess(proc, f"http://127.0.0.1:{port}", stderr_path)
    try:
        wait_http_ok(f"{gw.url}/readyz", timeout=60, proc=proc)
        yield gw
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root and unshare to mount a small /dev/shm")
async def test_shared_memory_too_small(gateway: GatewayProcess, tmp_path: Path) -> None:
    # Client sees: with room in /dev/shm, a large array travels by shared memory. With a 1 MiB /dev/shm, the same
    # request is either served (the array falls back to a pipe: 200, the same result) or refused with a clear 503
    # problem; never a 500, never a crashed worker. Nothing is left in /dev/shm afterwards, and the gateway goes on
    # serving.
    body = payload()
    async with aiohttp.ClientSession() as client:
        status, expected, _ = await transform(client, gateway, body)
        assert status == 200
        assert metric(await scrape(client, gateway), "gateway_cpu_pool_transfer_bytes_total", transport="shm") > 0

    with serve_with_small_shm(tmp_path, config(compute=COMPUTE, limits=LIMITS, server=SERVER), "1m") as small:
        shm_dir = Path(f"/proc/{small.proc.pid}/root/dev/shm")
        async with aiohttp.ClientSession() as client:
            for _ in range(3):
                status, answer, headers = await transform(client, small, body)
                assert status in (200, 503), answer
                if status == 200:
                    assert answer == expected
                else:
                    assert headers["Content-Type"] == "application/problem+json"
                    assert "shared memory" in answer["detail"]
            text = await scrape(client, small)
            status, answer, _ = await transform(client, small, payload(10))
            assert status == 200
        assert metric(text, "gateway_cpu_pool_shm_bytes") == 0
        # multiprocessing's own semaphores live there too (sem.*), for as long as the pool does.
        leftover = await asyncio.to_thread(lambda: [p.name for p in shm_dir.iterdir() if not p.name.startswith("sem.")])
        assert leftover == [], "shared-memory segments leaked"
        assert metric(text, "gateway_cpu_pool_worker_restarts_total") == 0
    assert "Traceback" not in small.stderr()
