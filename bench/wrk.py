"""Closed-loop load with wrk (Debian): the most a variant can serve. Results come back through a Lua ``done``
hook as one JSON line, so no human-readable output is parsed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

SCRIPT = """\
local f = assert(io.open("{body}", "rb"))
wrk.method = "{method}"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "{content_type}"

done = function(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,'
    .. '"p50_us":%d,"p99_us":%d,"max_us":%d}}\\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def run_wrk(
    wrk: str,
    url: str,
    *,
    body_file: Path,
    seconds: float,
    connections: int,
    cpus_prefix: list[str],
    method: str = "POST",
    content_type: str = "application/json",
    timeout_s: float = 10.0,
) -> dict[str, Any]:
    """Run wrk for ``seconds`` with ``connections`` (one thread); return its counts and rate.

    Raises RuntimeError when wrk fails or prints no result."""
    script = body_file.with_suffix(".lua")
    script.write_text(SCRIPT.format(body=body_file, method=method, content_type=content_type))
    duration = max(1, round(seconds))  # wrk takes whole seconds
    cmd = [
        *cpus_prefix,
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{duration}s",
        f"--timeout={timeout_s:g}s",
        "-s",
        str(script),
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, timeout=duration + 60, check=False)
    out = done.stdout.decode(errors="replace")
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            data: dict[str, Any] = json.loads(line[len("WRKJSON ") :])
            seconds_run = data["duration_us"] / 1e6
            data["seconds"] = seconds_run
            # Goodput: answers that were not errors (wrk counts non-2xx/3xx answers among its requests).
            data["rps"] = (data["requests"] - data["status"]) / seconds_run if seconds_run > 0 else 0.0
            data["errors"] = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
            return data
    raise RuntimeError(f"wrk printed no result (exit {done.returncode}): {done.stderr.decode(errors='replace')}")
