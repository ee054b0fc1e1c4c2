"""Where the gateway's CPU goes: py-spy samples the running process while the harness loads it, and the samples
are reduced to self and inclusive shares per function, and to self shares per layer of a request (``LAYERS``).

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

# The layers of a request, each named by the files its code lives in (the path py-spy shows: relative to the
# sys.path entry it was imported from). The first matching prefix wins, so the specific ones come first.
LAYERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "server",
        "server and protocol (uvicorn, the gateway's protocol and admission)",
        ("uvicorn/", "httptools/", "aiohttp/web", "app/security/protocol.py", "app/security/uvicorn_hook.py",
         "app/security/admission.py", "app/lifecycle/server.py", "app/lifecycle/listener.py"),
    ),
    ("framework", "framework (FastAPI, Starlette)", ("fastapi/", "starlette/", "anyio/")),
    (
        "front",
        "front layer (app/middleware/, the rules it applies from app/security/, in-flight count)",
        ("app/middleware/", "app/security/", "app/lifecycle/inflight.py", "app/lifecycle/drain.py"),
    ),
    ("sources", "gateway's per-source code (app/aggregate/execute.py, app/upstream/)",
     ("app/aggregate/execute.py", "app/upstream/")),
    ("http_client", "HTTP client (aiohttp, yarl, multidict)",
     ("aiohttp/", "yarl/", "multidict/", "aiohappyeyeballs/", "aiosignal/", "frozenlist/", "propcache/", "httpx/",
      "httpcore/")),
    ("json", "JSON (orjson, pydantic validation, json, app/jsonkeys.py)",
     ("orjson/", "pydantic/", "pydantic_core/", "json/", "app/jsonkeys.py")),
    ("logging", "logging and trace context (logging, app/observability/logging.py, tracing.py)",
     ("logging/", "pythonjsonlogger/", "opentelemetry/", "app/observability/logging.py",
      "app/observability/tracing.py")),
    ("metrics", "metrics and samplers (prometheus_client, app/observability/)",
     ("prometheus_client/", "app/observability/", "app/lifecycle/gauges.py")),
    ("endpoint", "endpoint and other own code (app/routes/, plan, answer; the bare callable)", ("app/", "bench/")),
    ("loop", "event loop and tasks (asyncio's Python code, uvloop)", ("asyncio/", "uvloop/", "selectors.py")),
)  # fmt: skip
OTHER = ("other", "other (no frame of a layer: the interpreter's start-up, threading)")
# Prometheus scrapes are no request's work: the harness scrapes before and after each run, a deployment every few
# seconds. Their samples are a layer of their own, whatever the innermost frame.
SCRAPE = ("scrape", "/metrics scrapes (the harness's, around each run; not per request)")
SCRAPE_FRAME = "generate_latest (prometheus_client/"
LAYER_LABELS = {key: label for key, label, _ in LAYERS} | dict((OTHER, SCRAPE))
# The event loop's thread is the main thread of `python -m app`: its stacks start here.
MAIN_THREAD_ROOT = "_run_module_as_main"
_LINE = re.compile(r":\d+\)$")
_FILE = re.compile(r"\(([^()]*?)(?::\d+)?\)$")


def _function(frame: str) -> str:
    return _LINE.sub(")", frame.strip())


def layer_of(frame: str) -> str | None:
    """The layer a frame's file belongs to, or None for code that is no layer's own (the standard library's
    helpers: enum, typing, functools, contextlib, re, ...), whose time is its caller's."""
    found = _FILE.search(frame)
    if found is None:
        return None
    path = found.group(1)
    for key, _, prefixes in LAYERS:
        if path.startswith(prefixes):
            return key
    return None


def layer_of_stack(frames: list[str]) -> str:
    """Self time goes to the innermost frame that belongs to a layer. Time in C extensions (orjson, httptools,
    uvloop's loop, aiohttp's parser) has no frame of its own: it counts to the Python function that called it."""
    if any(frame.startswith(SCRAPE_FRAME) for frame in frames):
        return SCRAPE[0]
    for frame in reversed(frames):
        key = layer_of(frame)
        if key is not None:
            return key
    return OTHER[0]


def summarize_collapsed(lines: Iterable[str], top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares per function of the main (event-loop) thread, and self shares per layer (they sum
    to 1), from py-spy's raw output."""
    self_n: collections.Counter[str] = collections.Counter()
    incl_n: collections.Counter[str] = collections.Counter()
    layer_n: collections.Counter[str] = collections.Counter()
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
        layer_n[layer_of_stack(frames)] += n
        for frame in set(frames):
            incl_n[frame] += n

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(c / total, 3)) for name, c in counter.most_common(top)] if total else []

    return {
        "samples": total,
        "layers": {key: round(layer_n[key] / total, 3) if total else 0.0 for key in LAYER_LABELS},
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
