"""The diagnostics resource: fault handler, SIGUSR1 dumps, task ages, tracemalloc, and the profiler."""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import logging
import signal
import sys
import tracemalloc
from typing import TYPE_CHECKING, Any

from app.diagnostics.introspect import TaskAges, format_dump, task_snapshot, thread_snapshot
from app.diagnostics.profiling import LoopProfiler
from app.settings import DiagnosticsSettings

if TYPE_CHECKING:
    from app.compute.pool import CpuPool
    from app.db.pool import Database

log = logging.getLogger("app.diagnostics")

DUMP_SIGNAL = signal.SIGUSR1


def _gc_state() -> dict[str, Any]:
    """The collector's settings and work so far (server.gc_interval_s and gc_thresholds, app/lifecycle/heap.py):
    ``count_trigger`` is off while the collector runs on the loop's clock."""
    return {
        "count_trigger": gc.isenabled(),
        "thresholds": list(gc.get_threshold()),
        "pending": list(gc.get_count()),
        "frozen_objects": gc.get_freeze_count(),
        "generations": gc.get_stats(),
    }


class Diagnostics:
    def __init__(
        self, settings: DiagnosticsSettings, *, db: Database | None = None, cpu: CpuPool | None = None
    ) -> None:
        self._settings = settings
        self._db = db
        self._cpu = cpu
        self.task_ages = TaskAges(settings.task_census_interval_s)
        self.profiler = LoopProfiler()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started_tracemalloc = False
        self._signal_installed = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if not faulthandler.is_enabled():
            # A fatal signal (SIGSEGV in a C extension, say) dumps every thread's stack to stderr.
            faulthandler.enable(file=sys.stderr, all_threads=True)
        self.task_ages.start()
        if self._settings.tracemalloc_frames > 0 and not tracemalloc.is_tracing():
            tracemalloc.start(self._settings.tracemalloc_frames)
            self._started_tracemalloc = True
        if self._settings.dump_signal:
            try:
                self._loop.add_signal_handler(DUMP_SIGNAL, self.dump_to_log)
            except (RuntimeError, ValueError):  # not the main thread: no signals to catch here
                return
            # Chained: the C-level dump to stderr works even when the loop is stuck; the loop-side dump (tasks
            # included) follows as soon as the loop runs.
            faulthandler.register(DUMP_SIGNAL, file=sys.stderr, all_threads=True, chain=True)
            self._signal_installed = True

    def busy_since(self, ident: int) -> float | None:
        db = self._db
        if db is None:
            return None
        return db.executor.running_threads().get(ident)

    def dump_to_log(self) -> None:
        threads = thread_snapshot(self.busy_since)
        tasks = task_snapshot(self.task_ages)
        log.warning(
            "diagnostic dump (%s): %d threads, %d tasks\n%s",
            DUMP_SIGNAL.name,
            len(threads),
            len(tasks),
            format_dump(threads, tasks),
            extra={"event": "diagnostic_dump", "threads": len(threads), "tasks": len(tasks)},
        )

    def memory(self, top: int = 25) -> dict[str, Any]:
        import psutil

        info = psutil.Process().memory_info()
        shm = self._cpu.shm_bytes_held() if self._cpu is not None else 0
        out: dict[str, Any] = {"rss_bytes": info.rss, "vms_bytes": info.vms, "shm_bytes": shm, "gc": _gc_state()}
        if not tracemalloc.is_tracing():
            out["tracemalloc"] = {"enabled": False, "hint": "set diagnostics.tracemalloc_frames > 0 (it costs)"}
            return out
        snapshot = tracemalloc.take_snapshot().filter_traces(
            (
                tracemalloc.Filter(False, tracemalloc.__file__),
                tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
            )
        )
        current, peak = tracemalloc.get_traced_memory()
        out["tracemalloc"] = {
            "enabled": True,
            "traced_bytes": current,
            "peak_bytes": peak,
            "top": [
                {"site": str(stat.traceback[0]), "size_bytes": stat.size, "count": stat.count}
                for stat in snapshot.statistics("lineno")[:top]
            ],
        }
        return out

    async def aclose(self) -> None:
        loop = self._loop
        if loop is None:
            return
        if self._signal_installed:
            faulthandler.unregister(DUMP_SIGNAL)
            loop.remove_signal_handler(DUMP_SIGNAL)
        await self.task_ages.aclose()
        if self._started_tracemalloc:
            tracemalloc.stop()
