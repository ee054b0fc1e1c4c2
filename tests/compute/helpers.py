"""Shared by the compute and /transform tests: settings, /dev/shm accounting, .npy helpers, the plugin package."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from app.compute.stats import JobRecord
from app.settings import Settings
from tests.support.gateway import make_settings
from tests.support.session import SHM_PREFIX

SHM_DIR = Path("/dev/shm")
PLUGIN_DIST = Path(__file__).parent / "plugin_dist"
NPY = "application/x-npy"


def compute_settings(**compute: Any) -> Settings:
    """Gateway settings with the CPU pool on: two workers, this session's segment prefix, overridable."""
    return make_settings(compute={"enabled": True, "workers": 2, "shm_prefix": SHM_PREFIX, **compute})


def segments() -> list[str]:
    """This session's segments in /dev/shm right now."""
    return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(SHM_PREFIX))


def assert_no_segments() -> None:
    assert segments() == [], "shared-memory segments were left in /dev/shm"


@pytest.fixture
def shm_guard() -> Iterator[None]:
    """Lists /dev/shm before and after the test and fails if any segment of this session survived it."""
    before = segments()
    assert before == [], f"segments left by an earlier test: {before}"
    yield
    assert_no_segments()


@pytest.fixture
def acme_plugins(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Puts the example third-party distribution on sys.path: real entry-point discovery finds it."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIST))
    return PLUGIN_DIST


def npy_bytes(array: npt.NDArray[Any]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def from_npy(body: bytes) -> npt.NDArray[Any]:
    return np.load(io.BytesIO(body), allow_pickle=False)


def trig_log_reference(x: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    v = np.asarray(x, dtype=np.float64)
    result: npt.NDArray[np.float64] = np.sin(v) * np.cos(v) + np.log1p(np.abs(v))
    return result


def primes_upto(n: int) -> int:
    """π(n), computed independently of the transform (NumPy sieve)."""
    if n < 2:
        return 0
    flags = np.ones(n + 1, dtype=bool)
    flags[:2] = False
    for p in range(2, int(n**0.5) + 1):
        if flags[p]:
            flags[p * p :: p] = False
    return int(flags.sum())


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


async def await_until(condition: Callable[[], bool], within: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` from async code (a deadline, never a fixed sleep)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Recorder:
    """A PoolObserver that keeps what it is told."""

    def __init__(self) -> None:
        self.records: list[JobRecord] = []
        self.rejected: list[str] = []
        self.started: list[tuple[str, float]] = []
        self.exits: list[tuple[int | None, str]] = []

    def job_rejected(self, transform: str) -> None:
        self.rejected.append(transform)

    def job_started(self, transform: str, queue_wait_s: float) -> None:
        self.started.append((transform, queue_wait_s))

    def job_finished(self, record: JobRecord) -> None:
        self.records.append(record)

    def worker_exited(self, pid: int | None, reason: str) -> None:
        self.exits.append((pid, reason))
