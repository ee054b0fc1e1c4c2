"""External tools (Debian packages installed on demand) and a description of the machine the run is on."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil

# binary -> Debian package
PACKAGES = {"wrk": "wrk", "nginx": "nginx-light"}
_SBIN = ("/usr/sbin", "/sbin")
_POLICY_RC = Path("/usr/sbin/policy-rc.d")


def find(binary: str) -> str | None:
    found = shutil.which(binary)
    if found:
        return found
    for folder in _SBIN:
        candidate = Path(folder) / binary
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


@contextlib.contextmanager
def _services_not_started() -> Iterator[None]:
    # Installing nginx must not start a system nginx on port 80: Debian's invoke-rc.d asks policy-rc.d first.
    if _POLICY_RC.exists():
        yield
        return
    _POLICY_RC.write_text("#!/bin/sh\nexit 101\n")
    _POLICY_RC.chmod(0o755)
    try:
        yield
    finally:
        _POLICY_RC.unlink(missing_ok=True)


def ensure_tools(*, install: bool, say: Callable[[str], None]) -> dict[str, str | None]:
    """Path of every tool in PACKAGES; missing ones are installed with apt-get when ``install`` and we are root.
    A tool that stays missing maps to None and the harness falls back (see the report's "tools")."""
    paths = {binary: find(binary) for binary in PACKAGES}
    missing = sorted(PACKAGES[b] for b, p in paths.items() if p is None)
    if missing and install and os.geteuid() == 0 and shutil.which("apt-get"):
        say(f"installing {' '.join(missing)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-q", "--no-install-recommends", *missing]
        with _services_not_started():
            done = subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=False)
            if done.returncode != 0:
                subprocess.run(
                    ["apt-get", "-o", "DPkg::Lock::Timeout=600", "update", "-q"],
                    env=env,
                    capture_output=True,
                    timeout=600,
                    check=False,
                )
                done = subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=False)
        if done.returncode != 0:
            say(f"apt-get failed: {done.stderr.decode(errors='replace')[-500:]}")
        paths = {binary: find(binary) for binary in PACKAGES}
    return paths


def _version(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=10, check=False)
    except OSError:
        return "?"
    text = (done.stdout or done.stderr).decode(errors="replace").strip().splitlines()
    return text[0] if text else "?"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def machine(tools: dict[str, str | None]) -> dict[str, Any]:
    packages = ("fastapi", "uvicorn", "uvloop", "httptools", "aiohttp", "httpx", "requests", "orjson", "pydantic")
    versions = {}
    for name in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    os_name = "?"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    return {
        "cpu_model": _cpu_model(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpus_online": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "os": os_name,
        "python": sys.version.split()[0],
        "packages": versions,
        "wrk": _version([wrk, "--version"]) if (wrk := tools.get("wrk")) else None,
        "nginx": _version([nginx, "-v"]) if (nginx := tools.get("nginx")) else None,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
