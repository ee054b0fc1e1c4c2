"""`gateway doctor`: check a host against the configuration before deploying. One verdict a line; exit 1 on FAIL.

Each check is independent and bounded in time, so a dead database or upstream cannot hang the command.
"""

from __future__ import annotations

import math
import multiprocessing
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from app.settings import Settings
from app.sizing import cgroup_cpu_limit, effective_cpu_count

Verdict = Literal["OK", "WARN", "FAIL"]
CONNECT_TIMEOUT_S = 3.0
# Default transform input budget when the config names none: two 64 MiB arrays (input and output) per worker.
DEFAULT_SHM_PER_WORKER = 2 * 64 * 1024 * 1024


@dataclass(frozen=True)
class Finding:
    verdict: Verdict
    check: str
    detail: str

    def line(self) -> str:
        return f"{self.verdict:<4} {self.check}: {self.detail}"


def check_cpu(settings: Settings) -> Iterator[Finding]:
    cpus = effective_cpu_count()
    limit = cgroup_cpu_limit()
    where = f"cgroup limit {limit:g} CPUs" if limit is not None else "no cgroup CPU limit"
    workers = settings.compute.workers
    if settings.compute.enabled and workers > cpus:
        yield Finding("FAIL", "cpu", f"compute.workers={workers} exceeds the {cpus} usable CPUs ({where}): workers "
                                     "will time-slice and every transform gets slower")  # fmt: skip
    else:
        yield Finding("OK", "cpu", f"{cpus} usable CPUs ({where}); compute.workers={workers}")
    threads = settings.database.executor_threads
    verdict: Verdict = "WARN" if threads > 32 else "OK"
    yield Finding(verdict, "db threads", f"database.executor_threads={threads} (rule of thumb: min(32, cpus*4))")


def check_shm(settings: Settings, shm_path: Path) -> Iterator[Finding]:
    if not settings.compute.enabled:
        yield Finding("OK", "shm", "compute is disabled")
        return
    try:
        free = shutil.disk_usage(shm_path).free
    except OSError as exc:
        yield Finding("FAIL", "shm", f"{shm_path}: {exc.strerror}")
        return
    per_worker = getattr(settings.compute, "shm_bytes_per_worker", DEFAULT_SHM_PER_WORKER)
    needed = settings.compute.workers * per_worker
    if free < needed:
        workers = settings.compute.workers
        detail = f"{shm_path} has {_mib(free)} free; {workers} workers need {_mib(needed)} for shared-memory transforms"
        yield Finding("FAIL", "shm", detail + " (raise the container's shm size)")
    else:
        yield Finding("OK", "shm", f"{shm_path} has {_mib(free)} free (need {_mib(needed)})")


def check_database(settings: Settings, replicas: int) -> Iterator[Finding]:
    if settings.database_url is None:
        yield Finding("OK", "database", "no database configured")
        return
    import psycopg2

    try:
        conn = psycopg2.connect(settings.database_url.get_secret_value(), connect_timeout=int(CONNECT_TIMEOUT_S))
    except psycopg2.Error as exc:
        yield Finding("FAIL", "database", f"unreachable: {' '.join(str(exc).split())}")
        return
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW max_connections")
            max_conn = int(cur.fetchone()[0])  # type: ignore[index]
            cur.execute("SHOW superuser_reserved_connections")
            reserved = int(cur.fetchone()[0])  # type: ignore[index]
    finally:
        conn.close()
    wanted = replicas * settings.db_pool_size
    usable = max_conn - reserved
    if wanted > usable:
        yield Finding("FAIL", "database", f"{replicas} replicas x pool {settings.db_pool_size} = {wanted} connections, "
                                          f"over max_connections {max_conn} - {reserved} reserved")  # fmt: skip
    else:
        yield Finding("OK", "database", f"reachable; {wanted} of {usable} usable connections at {replicas} replicas")


def check_upstreams(settings: Settings) -> Iterator[Finding]:
    for name, upstream in settings.upstreams.items():
        for url in upstream.endpoints or [upstream.base_url]:  # each endpoint of one that has several
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                with socket.create_connection((parts.hostname or "", port), timeout=CONNECT_TIMEOUT_S):
                    pass
            except OSError as exc:
                yield Finding("FAIL", f"upstream {name}", f"{parts.hostname}:{port} unreachable: {exc.strerror or exc}")
            else:
                yield Finding("OK", f"upstream {name}", f"{parts.hostname}:{port} accepts connections")


def check_runtime(settings: Settings) -> Iterator[Finding]:
    interval = sys.getswitchinterval()
    verdict: Verdict = "WARN" if interval > 0.005 else "OK"
    yield Finding(verdict, "gil", f"switch interval {interval * 1000:g} ms (a long one lengthens loop stalls)")
    method = settings.compute.start_method
    if method not in multiprocessing.get_all_start_methods():
        yield Finding("FAIL", "start method", f"'{method}' is not available on this platform")
    else:
        yield Finding("OK", "start method", f"'{method}' (never 'fork' from a threaded parent)")


def run_doctor(settings: Settings, *, replicas: int = 1, shm_path: Path = Path("/dev/shm"),
               out: Callable[[str], None] = print) -> int:  # fmt: skip
    """Print one verdict a line; return 1 when any check failed."""
    checks = [
        check_cpu(settings),
        check_shm(settings, shm_path),
        check_database(settings, replicas),
        check_upstreams(settings),
        check_runtime(settings),
    ]
    failed = False
    for findings in checks:
        for finding in findings:
            out(finding.line())
            failed = failed or finding.verdict == "FAIL"
    out("verdict: " + ("problems found" if failed else "ready to deploy"))
    return 1 if failed else 0


def _mib(n: float) -> str:
    return f"{math.floor(n / 1024 / 1024)} MiB"
