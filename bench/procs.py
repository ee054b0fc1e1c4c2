"""Processes the harness starts: pinned to a core with taskset, logs to files, ready when their health URL
answers, stopped with SIGTERM (then SIGKILL for their own process group) when the harness is done."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

HTTP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Pinning:
    """Which CPUs the server under test gets, and which the load generator and upstreams get."""

    server: str | None
    load: str | None
    every: str | None = None  # all usable CPUs: for runs that need both cores (the harness itself is pinned)

    @classmethod
    def detect(cls) -> Pinning:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return cls(None, None, None)
        # The server under test on the first core; everything else (load, upstreams, PostgreSQL) on the rest.
        return cls(str(cpus[0]), ",".join(str(c) for c in cpus[1:]), ",".join(str(c) for c in cpus))

    def prefix(self, cpus: str | None) -> list[str]:
        return ["taskset", "-c", cpus] if cpus else []

    def server_busy_s(self) -> float:
        """CPU seconds spent so far by every process on the server CPU(s), from /proc/stat (10 ms resolution).
        Minus the variant's own CPU time over a run, it is what other processes took from it."""
        cpus = {f"cpu{c}" for c in (self.server or "").split(",") if c}
        busy = 0
        with open("/proc/stat") as fh:
            for line in fh:
                fields = line.split()
                if fields and fields[0] in cpus:
                    # user, nice, system: time in processes. Interrupts and softirqs (loopback traffic the benchmark
                    # itself causes) are left out, so what remains after the variant's own time is other processes.
                    busy += sum(int(v) for v in fields[1:4])
        return busy / os.sysconf("SC_CLK_TCK")

    def describe(self) -> str:
        if self.server is None:
            return "no pinning (fewer than 2 CPUs)"
        return f"server under test on CPU {self.server}; load generator, upstreams and PostgreSQL on CPU {self.load}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def http_request(
    url: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    content_type: str = "application/json",
    timeout: float = HTTP_TIMEOUT_S,
) -> tuple[int, bytes, dict[str, str]]:
    """One request with urllib; any HTTP status is returned, not raised. Raises OSError when nothing answers."""
    req = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        return err.code, err.read(), {k.lower(): v for k, v in err.headers.items()}


def listen_overflows() -> int:
    """The kernel's count of connections dropped because a listen queue was full (TcpExt ListenOverflows,
    machine-wide), or 0 where /proc/net/netstat is not readable."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=False)).get("ListenOverflows", 0))
    return 0


class ServiceFailed(RuntimeError):
    pass


class Service:
    """One child process of the harness."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: str | None,
        health_url: str | None,
        log_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.cpus = cpus
        self.health_url = health_url
        self.log_path = log_dir / f"{name}.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_seconds: float | None = None
        self._signalled = False

    def start(self) -> Service:
        prefix = ["taskset", "-c", self.cpus] if self.cpus else []
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*prefix, *self.argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(self.env or {})},
                start_new_session=True,  # our own process group: Ctrl-C reaches the harness, which stops us
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll the health URL until it answers 200. Raises ServiceFailed with the log's tail otherwise."""
        if self.health_url is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServiceFailed(f"{self.name} exited with {self.returncode()}:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                status, _, _ = http_request(self.health_url, timeout=1.0)
                if status == 200:
                    return
            time.sleep(0.05)
        raise ServiceFailed(f"{self.name}: {self.health_url} did not answer 200 within {timeout:.0f} s")

    def pin(self, cpus: str | None) -> None:
        """Move the running process, its threads and its children to ``cpus`` (after a start on every CPU)."""
        if cpus is None or not self.alive():
            return
        mask = {int(c) for c in cpus.split(",")}
        proc = psutil.Process(self.pid)
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error, OSError):
                for thread in p.threads():
                    os.sched_setaffinity(thread.id, mask)

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process itself (all its threads)."""
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def children_cpu_seconds(self) -> float:
        """CPU time (user + system) of every descendant (worker processes), also those that exited and were reaped
        by the process or one of its descendants (a pool's replaced workers)."""
        root = psutil.Process(self.pid)
        total = 0.0
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.children_user + times.children_system
                if proc.pid != root.pid:
                    total += times.user + times.system
        return total

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def terminate_and_time(self, timeout: float) -> float | None:
        """SIGTERM, then the seconds until the process exited (None if it did not within ``timeout``)."""
        assert self.proc is not None
        started = time.monotonic()
        self.signal_stop()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self.exit_seconds = time.monotonic() - started
        return self.exit_seconds

    def signal_stop(self) -> None:
        """SIGTERM without waiting (stop() then waits). Once only: a second SIGTERM cuts a gateway's drain short."""
        if self.proc is not None and self.proc.poll() is None and not self._signalled:
            self._signalled = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        self.signal_stop()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group this harness created for it
            proc.wait(timeout=10)
