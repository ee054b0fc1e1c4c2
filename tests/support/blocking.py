"""The suite's guard against a blocked event loop: a test during which a gateway's loop was blocked for
LIMIT_MS or longer fails, naming the code that held it.

Every gateway a test runs watches its own loop with the gateway's BlockingDetector (app/observability/blocking.py),
at LIMIT_MS: in-process ones through make_settings()'s default, `gateway serve` processes through the
environment (GATEWAY_OBSERVABILITY__BLOCKING_THRESHOLD_MS, set for the session). The detector logs one
``loop_blocked`` warning per stall, while the loop is still stuck; the ``loop_never_blocked`` fixture (autouse,
tests/conftest.py) collects them: in-process through a logging handler, from `gateway serve` through the log that
tests/support/gateway.py and tests/support/procs.py keep of every process they start.

LIMIT_MS is 1 s: far above anything a gateway should do on its loop, and above what a loaded 2-core CI machine
does to a test process (GC pauses, scheduling, a cold import). A test that blocks a loop for longer on purpose says
so with ``@pytest.mark.blocks_loop``. A test that sets a lower threshold of its own is not failed by its reports
(a detector reports at its threshold, so a record under LIMIT_MS says nothing about the stall's full length).
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

LIMIT_MS = 1000.0
MARKER = "blocks_loop"
_LOGGER = "app.observability.blocking"
# The detector's message, the same in the JSON and the text log formats.
_MESSAGE = re.compile(r"event loop blocked for (\d+) ms in ([^\"\n]*)")


@dataclass
class _Log:
    proc: subprocess.Popen[bytes]
    offset: int = 0


class _Collector(logging.Handler):
    def __init__(self, stalls: list[str]) -> None:
        super().__init__(logging.WARNING)
        self._stalls = stalls

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == "loop_blocked" and getattr(record, "blocked_ms", 0) >= LIMIT_MS:
            self._stalls.append(f"in-process gateway: {record.getMessage()}")


@dataclass
class BlockedLoops:
    """Stalls reported while a test ran, by in-process gateways and by the `gateway serve` logs watched."""

    _logs: dict[Path, _Log] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def watch_log(self, path: Path, proc: subprocess.Popen[bytes]) -> None:
        """Read ``path`` (a `gateway serve`'s stderr) for stalls until ``proc`` has exited."""
        with self._lock:
            self._logs[path] = _Log(proc)

    def scan_logs(self) -> list[str]:
        """Stalls logged since the last scan; forgets the logs of processes that have exited."""
        found: list[str] = []
        with self._lock:
            for path, log in list(self._logs.items()):
                done = log.proc.poll() is not None  # before reading: whatever it wrote is then in the file
                data = b""
                with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
                    f.seek(log.offset)
                    data = f.read()
                if not done:
                    data = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
                log.offset += len(data)
                text = data.decode(errors="replace")
                found += [
                    f"gateway serve (pid {log.proc.pid}): event loop blocked for {ms} ms in {where}"
                    for ms, where in _MESSAGE.findall(text)
                    if float(ms) >= LIMIT_MS
                ]
                if done:
                    del self._logs[path]
        return found

    @contextlib.contextmanager
    def watching(self) -> Iterator[list[str]]:
        """Collect the stalls of everything that runs inside; the list is complete on exit."""
        stalls: list[str] = []
        handler = _Collector(stalls)
        logger = logging.getLogger(_LOGGER)
        logger.addHandler(handler)
        self.scan_logs()  # what was logged before this test is not this test's
        try:
            yield stalls
        finally:
            logger.removeHandler(handler)
            stalls += self.scan_logs()


BLOCKED_LOOPS = BlockedLoops()


@pytest.fixture(autouse=True)
def loop_never_blocked(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails the test (at teardown) if a gateway's event loop was blocked for LIMIT_MS or longer meanwhile."""
    with BLOCKED_LOOPS.watching() as stalls:
        yield
    if stalls and request.node.get_closest_marker(MARKER) is None:
        pytest.fail(
            f"a gateway's event loop was blocked for {LIMIT_MS:.0f} ms or longer during this test "
            f"(mark it {MARKER} if that is what it tests):\n" + "\n".join(stalls),
            pytrace=False,
        )
