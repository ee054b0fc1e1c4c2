"""Where the gateway's event-loop thread spends its CPU: a profile taken with the gateway's own
``/debug/profile`` (pyinstrument, cpu mode) while the harness loads it, reduced to self and inclusive time per
function."""

from __future__ import annotations

import collections
import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.procs import http_request

# Inclusive shares of the loop thread's busy time, by the outermost frame of each part of a request.
BREAKDOWN = {
    "request_handling": "(starlette/applications.py",  # every middleware, routing, body, validation, endpoint
    "endpoint": "run_endpoint_function (fastapi/routing.py",  # the handler itself (planning, waiting, answer)
    "sources": "_one (app/aggregate/service.py",  # each source's task: limits, deadline, retries, the call
    "http_client": "call_once (app/upstream/call.py",  # aiohttp: one request and its body
}

_SITE = re.compile(r".*/(site-packages|lib/python3\.\d+)/")


def _where(frame: dict[str, Any]) -> str:
    file = _SITE.sub("", str(frame.get("file") or "?"))
    file = re.sub(r"^.*/(app|bench)/", r"\1/", file)
    return f"{frame.get('name', '?')} ({file}:{frame.get('line', '?')})"


def summarize_speedscope(doc: dict[str, Any], top: int = 15) -> dict[str, Any]:
    """Self and inclusive seconds per frame from an evented speedscope profile."""
    frames = doc["shared"]["frames"]
    self_s: collections.defaultdict[str, float] = collections.defaultdict(float)
    incl_s: collections.defaultdict[str, float] = collections.defaultdict(float)
    total = 0.0
    for profile in doc["profiles"]:
        stack: list[tuple[int, float]] = []
        last: float | None = None
        for event in profile.get("events", []):
            at = float(event["at"])
            if stack and last is not None:
                self_s[_where(frames[stack[-1][0]])] += at - last
            last = at
            if event["type"] == "O":
                stack.append((event["frame"], at))
            elif stack:
                frame, opened = stack.pop()
                name = _where(frames[frame])
                if all(f != frame for f, _ in stack):  # recursion counted once
                    incl_s[name] += at - opened
        total += float(profile.get("endValue", 0)) - float(profile.get("startValue", 0))
    busy = sum(self_s.values())

    def share(marker: str) -> float:
        found = [s for name, s in incl_s.items() if marker in name]
        return round(max(found, default=0.0) / busy, 3) if busy else 0.0

    return {
        "breakdown": {label: share(marker) for label, marker in BREAKDOWN.items()},
        "profiled_s": round(total, 3),
        "busy_s": round(busy, 3),
        "top_self": _top(self_s, busy, top),
        "top_inclusive": _top(incl_s, busy, top * 2),
    }


def _top(seconds: dict[str, float], busy: float, n: int) -> list[tuple[str, float, float]]:
    ranked = sorted(seconds.items(), key=lambda item: item[1], reverse=True)[:n]
    return [(name, round(s, 4), round(s / busy, 3) if busy else 0.0) for name, s in ranked]


def profile_under_load(admin_url: str, seconds: float, load: Callable[[], object], out: Path) -> dict[str, Any]:
    """Run ``load`` while the gateway profiles its loop thread for ``seconds``; keep the speedscope file."""
    holder: dict[str, Any] = {}

    def take() -> None:
        try:
            status, body, _ = http_request(
                f"{admin_url}/debug/profile?seconds={seconds:g}&mode=cpu&format=speedscope", timeout=seconds + 30
            )
            holder["status"], holder["body"] = status, body
        except OSError as exc:
            holder["error"] = str(exc)

    thread = threading.Thread(target=take, name="profile")
    thread.start()
    load()
    thread.join(timeout=seconds + 60)
    if holder.get("status") != 200:
        return {"error": holder.get("error") or f"/debug/profile answered {holder.get('status')}"}
    out.write_bytes(holder["body"])
    summary = summarize_speedscope(json.loads(holder["body"]))
    summary["file"] = out.name
    return summary
