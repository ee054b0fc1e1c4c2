"""Sizing rules: how many CPUs this process may really use, and the pool sizes that follow from it."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_cpu_limit(path: Path = CGROUP_CPU_MAX) -> float | None:
    """The CPU quota of this container in cores (cgroup v2 ``cpu.max``), or None when unlimited."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def effective_cpu_count() -> int:
    """CPUs this process can run on, capped by the cgroup quota (a pod with `limits.cpu: 2` on a 64-core node)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


def default_io_threads() -> int:
    # Threads waiting on sockets cost little CPU; four per core, capped so the DB never sees a connection storm.
    return min(32, effective_cpu_count() * 4)


def default_cpu_workers() -> int:
    return effective_cpu_count()
