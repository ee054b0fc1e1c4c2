"""Where the gateway's CPU goes: py-spy samples the running process while the harness loads it, and the samples
are reduced to self and inclusive shares per function, and to a breakdown by part of a request.

py-spy reads the interpreter's stacks from outside, so it sees every Python frame, also those called from
uvloop's C loop (a profiler hooked into the interpreter, such as pyinstrument, attributes most of that time to
the loop's ``run``). It pauses the process for each sample (consistent stacks; only the profiled run, never a
measured one, pays for it). Idle time is left out: shares are of the time the process was running.
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# Inclusive shares by the outermost frame of each part of a request (line numbers dropped).
BREAKDOWN = {
    # The front layer around the app (app/middleware/front.py): cross-cutting rules, routing, body, endpoint.
    "request_handling": "Front.__call__ (app/middleware/front.py)",
    "endpoint": "_aggregate (app/routes/aggregate.py)",  # the handler itself (planning, waiting, answer)
    "sources": "Aggregator._one (app/aggregate/execute.py)",  # each source's task: limits, deadline, retries, call
    "http_client": "call_once (app/upstream/call.py)",  # aiohttp: one request and its body
}
# The event loop's thread is the main thread of `python -m app`: its stacks start here.
MAIN_THREAD_ROOT = "_run_module_as_main"
_LINE = re.compile(r":\d+\)$")


def _function(frame: str) -> str:
    return _LINE.sub(")", frame.strip())


def summarize_collapsed(lines: Iterable[str], top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares per function of the main (event-loop) thread, from py-spy's raw output."""
    self_n: collections.Counter[str] = collections.Counter()
    incl_n: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_function(f) for f in stack.split(";") if f]
        if not frames or not frames[0].startswith(MAIN_THREAD_ROOT):
            continue  # other threads (the blocking detector's watchdog, executors) sleep most of the time
        total += n
        self_n[frames[-1]] += n
        for frame in set(frames):
            incl_n[frame] += n

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(c / total, 3)) for name, c in counter.most_common(top)] if total else []

    return {
        "samples": total,
        "breakdown": {k: round(incl_n.get(m, 0) / total, 3) if total else 0.0 for k, m in BREAKDOWN.items()},
        "top_self": share(self_n),
        "top_inclusive": share(incl_n),
    }


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return found if Path(found).exists() else None


def profile_under_load(pid: int, seconds: float, load: Callable[[], object], out: Path) -> dict[str, Any]:
    """Sample ``pid`` with py-spy for ``seconds`` while ``load`` runs; keep the collapsed stacks in ``out``."""
    binary = py_spy()
    if binary is None:
        return {"error": "py-spy is not installed"}
    holder: dict[str, Any] = {}

    def record() -> None:
        cmd = [binary, "record", "-p", str(pid), "-d", f"{max(1, round(seconds))}", "-r", "500", "-f", "raw",
               "-o", str(out)]  # fmt: skip
        try:
            done = subprocess.run(cmd, capture_output=True, timeout=seconds + 60, check=False)
            holder["rc"], holder["stderr"] = done.returncode, done.stderr.decode(errors="replace")[-500:]
        except (OSError, subprocess.TimeoutExpired) as exc:
            holder["rc"], holder["stderr"] = -1, str(exc)

    thread = threading.Thread(target=record, name="py-spy")
    thread.start()
    load()
    thread.join(timeout=seconds + 90)
    if holder.get("rc") != 0 or not out.exists():
        return {"error": f"py-spy failed: {holder.get('stderr', '').strip()}"}
    summary = summarize_collapsed(out.read_text().splitlines())
    summary["file"] = out.name
    return summary
