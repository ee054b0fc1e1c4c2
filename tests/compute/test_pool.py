"""The CPU pool with real worker processes: warm start, recycling, timeouts, crashes, admission, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from app.compute.pool import CpuPool
from app.errors import (
    InvalidInputError,
    OverloadedError,
    ResourceClosedError,
    StartupError,
    TransformFailedError,
    TransformTimeoutError,
    WorkerCrashedError,
    WorkerUnavailableError,
)
from app.worker import shm
from app.worker.wire import InlineArray, Job, ShmArray
from tests.compute.helpers import Recorder, assert_no_segments, await_until, compute_settings, segments, shm_guard

pytestmark = pytest.mark.usefixtures("shm_guard")
__all__ = ["shm_guard"]

ACME = [(n, f"acme_transforms:{n.upper()}") for n in ("sleep", "boom", "bad_shape", "refuse", "moving_average")]


@contextlib.asynccontextmanager
async def started_pool(
    monkeypatch: pytest.MonkeyPatch, recorder: Recorder | None = None, **compute: Any
) -> AsyncIterator[CpuPool]:
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "plugin_dist"))
    settings = compute_settings(load_plugins=False, **compute).compute
    pool = CpuPool(settings, observer=recorder, extra_transforms=ACME)
    try:
        await pool.start()
        yield pool
    finally:
        await pool.aclose()


def job(name: str, data: Any, params: dict[str, Any] | None = None, fmt: str = "json") -> Job:
    return Job(name, params or {}, InlineArray(np.asarray(data)), fmt)  # type: ignore[arg-type]


async def run(pool: CpuPool, j: Job) -> Any:
    with pool.admit(j.transform) as admission:
        return await pool.run(j, admission)


def result_of(completed: Any) -> Any:
    import orjson

    assert completed.answer.inline is not None
    return orjson.loads(completed.answer.inline)["result"]


def numpy_mapped(pid: int) -> bool:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "_multiarray_umath" in maps


async def test_start_warms_every_worker_before_any_job(monkeypatch: pytest.MonkeyPatch) -> None:
    async with started_pool(monkeypatch, workers=2) as pool:
        pids = pool.worker_pids
        assert len(pids) == 2
        assert all(numpy_mapped(pid) for pid in pids), "a worker had not imported numpy at start-up"
        completed = await run(pool, job("trig_log", [0.5]))
        assert completed.record.worker_pid in pids
        assert pool.worker_pids == pids  # no process was started for the first job
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids)


async def test_workers_are_recycled_after_max_tasks_without_hanging(monkeypatch: pytest.MonkeyPatch) -> None:
    async with started_pool(monkeypatch, workers=1, max_tasks_per_child=2) as pool:
        used = [(await run(pool, job("trig_log", [float(i)]))).record.worker_pid for i in range(6)]
        assert used[0] == used[1] != used[2] == used[3] != used[4] == used[5]
        # A burst larger than the pool, every job recycling its worker: all finish.
        burst = await asyncio.wait_for(
            asyncio.gather(*(run(pool, job("trig_log", [float(i)])) for i in range(2))), timeout=30
        )
        assert len(burst) == 2
        assert pool.stats().counters["workers_recycled"] >= 3


async def test_a_job_past_its_timeout_gets_its_worker_killed_and_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    async with started_pool(monkeypatch, workers=1, job_timeout_s=0.5) as pool:
        old = pool.worker_pids
        started = time.monotonic()
        with pytest.raises(TransformTimeoutError, match=r"exceeded 0\.5 s"):
            await run(pool, job("sleep", [1.0], {"ms": 60_000}))
        assert time.monotonic() - started < 5  # killed at once, not after a SIGTERM grace period
        assert not psutil.pid_exists(old[0]) or psutil.Process(old[0]).status() == "zombie"
        assert result_of(await run(pool, job("trig_log", [0.0]))) == [0.0]
        assert pool.worker_pids != old
        assert pool.stats().counters["jobs_timeout"] == 1


async def test_a_worker_killed_mid_job_fails_that_job_only(monkeypatch: pytest.MonkeyPatch) -> None:
    async with started_pool(monkeypatch, workers=2) as pool:
        victim_job = asyncio.create_task(run(pool, job("sleep", [1.0], {"ms": 60_000})))
        # Started, not just handed over: a job killed before its worker began it is retried elsewhere.
        await await_until(lambda: bool(pool.stats().running_pids), what="the job to start")
        (victim,) = pool.stats().running_pids
        bystander = asyncio.create_task(run(pool, job("sleep", [2.0], {"ms": 300})))
        # The bystander runs on the other worker when the victim dies.
        await await_until(lambda: len(pool.stats().running_pids) == 2, what="both workers running")
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(WorkerCrashedError, match="SIGKILL"):
            await victim_job
        assert result_of(await bystander) == [2.0]
        assert result_of(await run(pool, job("trig_log", [0.0]))) == [0.0]
        await await_until(lambda: pool.stats().alive == 2)
        assert victim not in pool.worker_pids
        assert pool.stats().counters["workers_crashed"] == 1


async def test_a_job_sent_to_a_dead_idle_worker_is_retried_once(monkeypatch: pytest.MonkeyPatch) -> None:
    async with started_pool(monkeypatch, workers=1) as pool:
        (pid,) = pool.worker_pids
        os.kill(pid, signal.SIGKILL)
        await await_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie")
        # Its courier only learns of the death when it hands over this job: it never started, so it is retried.
        completed = await run(pool, job("trig_log", [0.0]))
        assert result_of(completed) == [0.0]
        assert completed.record.worker_pid != pid
        assert pool.stats().counters["retried"] == 1


async def test_admission_is_bounded_and_refuses_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder()
    async with started_pool(monkeypatch, recorder, workers=1, queue_limit=1) as pool:
        first, second = pool.admit("sleep"), pool.admit("sleep")
        started = time.monotonic()
        with pytest.raises(OverloadedError) as info:
            pool.admit("sleep")
        assert time.monotonic() - started < 0.1
        assert info.value.headers() == {"Retry-After": "1"}
        assert recorder.rejected == ["sleep"]
        first.release()
        pool.admit("sleep").release()
        second.release()
        assert pool.stats().admitted == 0


async def test_a_cancelled_waiting_job_frees_its_place_and_a_cancelled_running_one_its_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with started_pool(monkeypatch, workers=1, queue_limit=1) as pool:
        running = asyncio.create_task(run(pool, job("sleep", [1.0], {"ms": 60_000})))
        waiting = asyncio.create_task(run(pool, job("sleep", [2.0], {"ms": 0})))
        await await_until(lambda: pool.stats().waiting == 1)
        with pytest.raises(OverloadedError):
            pool.admit("trig_log")
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        assert pool.stats().waiting == 0
        pool.admit("trig_log").release()  # the place is free again
        (pid,) = pool.stats().busy_pids
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await await_until(lambda: pool.stats().alive == 1 and pid not in pool.worker_pids)
        assert result_of(await run(pool, job("trig_log", [0.0]))) == [0.0]
        assert pool.stats().counters["jobs_cancelled"] == 2


async def test_a_job_waiting_too_long_for_a_worker_fails_with_503(monkeypatch: pytest.MonkeyPatch) -> None:
    async with started_pool(monkeypatch, workers=1, queue_timeout_s=0.3) as pool:
        busy = asyncio.create_task(run(pool, job("sleep", [1.0], {"ms": 3_000})))
        await await_until(lambda: bool(pool.stats().busy_pids))
        with pytest.raises(WorkerUnavailableError, match=r"within 0\.3 s"):
            await run(pool, job("trig_log", [0.0]))
        busy.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await busy


async def test_transform_failures_are_reported_and_the_worker_lives_on(monkeypatch: pytest.MonkeyPatch) -> None:
    async with started_pool(monkeypatch, workers=1) as pool:
        pids = pool.worker_pids
        with pytest.raises(TransformFailedError, match="RuntimeError: boom"):
            await run(pool, job("boom", [1.0]))
        with pytest.raises(TransformFailedError, match=r"returned float64\[4\], declared float64\[3\]"):
            await run(pool, job("bad_shape", [1.0, 2.0, 3.0]))
        with pytest.raises(InvalidInputError, match="refused while running"):
            await run(pool, job("refuse", [1.0]))
        assert pool.worker_pids == pids
        assert pool.stats().counters["jobs_error"] == 3


async def test_shared_memory_jobs_move_no_array_bytes_through_the_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder()
    async with started_pool(monkeypatch, recorder, workers=1) as pool:
        data = np.arange(1 << 20, dtype=np.float64)  # 8 MiB
        with shm.Segment(pool.namer.next(), data.nbytes) as inp, shm.Segment(pool.namer.next(), 16 << 20) as out:
            inp.reserve()
            inp.array(data.shape, data.dtype)[:] = data
            ref = ShmArray(inp.name, data.shape, data.dtype.str)
            j = Job("sort", {"descending": True}, ref, "npy", out.name, out.size)
            completed = await run(pool, j)
            assert completed.answer.inline is None
            body = bytes(out.view()[: completed.answer.length])
        from tests.compute.helpers import from_npy

        np.testing.assert_array_equal(from_npy(body), data[::-1])
        inline = await run(pool, job("sort", data[:1000], {"descending": True}, fmt="npy"))
    shm_record, pickle_record = recorder.records
    assert (shm_record.input_transport, shm_record.output_transport) == ("shm", "shm")
    assert shm_record.shm_bytes == data.nbytes + completed.answer.length
    assert shm_record.pickle_bytes < 2048, "array bytes went through the pipe"
    assert (pickle_record.input_transport, pickle_record.output_transport) == ("pickle", "pickle")
    assert pickle_record.shm_bytes == 0
    assert pickle_record.pickle_bytes > 2 * 8000
    assert inline.answer.length == len(inline.answer.inline)


async def test_aclose_lets_a_running_job_finish_then_stops_every_worker(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="app.compute")
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "plugin_dist"))
    pool = CpuPool(compute_settings(load_plugins=False, workers=2).compute, extra_transforms=ACME)
    await pool.start()
    pids = pool.worker_pids
    data = np.ones(1 << 18)
    inp = shm.Segment(pool.namer.next(), data.nbytes)
    inp.array(data.shape, data.dtype)[:] = data
    j = Job("sleep", {"ms": 500}, ShmArray(inp.name, data.shape, data.dtype.str), "json")

    async def request() -> Any:
        # As the route does it: the input segment is unlinked before the place in the pool is given back.
        with pool.admit(j.transform) as admission:
            try:
                return await pool.run(j, admission)
            finally:
                inp.close()

    running = asyncio.create_task(request())
    await await_until(lambda: bool(pool.stats().busy_pids))
    closing = asyncio.create_task(pool.aclose())
    # The close began while the job ran (its 500 ms), and ended only after the job had: by the order in which
    # the two finished, not by a look at the close after a while.
    finished: list[str] = []
    running.add_done_callback(lambda _: finished.append("job"))
    closing.add_done_callback(lambda _: finished.append("close"))
    completed = await running
    await closing
    assert finished == ["job", "close"]
    assert completed.record.outcome == "ok"
    with pytest.raises(ResourceClosedError):
        pool.admit("trig_log")
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=10)
    assert alive == []
    assert_no_segments()
    assert not [r for r in caplog.records if "leftover" in r.getMessage()]


async def test_workers_ignore_sigint_and_sigterm(monkeypatch: pytest.MonkeyPatch) -> None:
    async with started_pool(monkeypatch, workers=1) as pool:
        (pid,) = pool.worker_pids
        os.kill(pid, signal.SIGINT)
        os.kill(pid, signal.SIGTERM)
        # No wait needed: an ignored signal is discarded when sent, and a fatal or handled one acts before the
        # worker can read its next job, so this job is answered by the same worker only if it survived both.
        completed = await run(pool, job("trig_log", [0.0]))
        assert completed.record.worker_pid == pid
        assert psutil.Process(pid).status() != "zombie"


async def test_a_transform_that_cannot_load_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = compute_settings(load_plugins=False).compute
    pool = CpuPool(settings, extra_transforms=[("nope", "no_such_module_anywhere:NOPE")])
    with pytest.raises(StartupError, match="no_such_module_anywhere"):
        await pool.start()
    await pool.aclose()
    assert pool.worker_pids == []


async def test_stale_segments_of_dead_instances_are_swept_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = compute_settings(load_plugins=False, workers=1).compute
    prefix = settings.shm_prefix
    dead = psutil.Popen(["true"])
    dead.wait()
    stale = shm.SHM_DIR / f"{prefix}{dead.pid}.12345_1"
    live_owner = shm.SegmentNamer(prefix).owner  # this process: alive
    live = shm.SHM_DIR / f"{prefix}{live_owner}_999"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    try:
        pool = CpuPool(settings)
        await pool.start()
        assert not stale.exists()
        assert live.exists()
    finally:
        live.unlink(missing_ok=True)
        stale.unlink(missing_ok=True)
        await pool.aclose()
    assert segments() == []
