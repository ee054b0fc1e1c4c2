"""What a test session may leave behind, kept where it can be found, and the check that it left nothing.

Every process the tests start inherits these from this session (set in ``tests/conftest.py`` before any test
runs):

- ``TMPDIR``: a directory of this session's own. A child killed with SIGKILL, or ended by the drain's watchdog
  with ``os._exit``, cannot remove multiprocessing's ``pymp-*`` directory; here it is found, named and removed,
  instead of piling up in /tmp. The session's own process keeps the real temporary directory (pytest's base
  temp, and its own ``pymp-*``, which multiprocessing removes at exit, after this check).
- ``GATEWAY_COMPUTE__SHM_PREFIX``: a shared-memory prefix of this session's own, so that the check sees only
  segments this session's gateways created, even with other test runs on the machine.
- ``GATEWAY_OBSERVABILITY__BLOCKING_THRESHOLD_MS``: the suite's limit for a blocked loop (tests/support/blocking.py).

pytest's own base temporary directory is in the session's directory too (``--basetemp``, unless given): the shared
/tmp/pytest-of-<user> is closed to other users (chmod 0700) by every pytest run that starts, which cut an embedded
PostgreSQL of this run, running as its own user under tmp_path, off its data directory.

At the end, a ``pymp-*`` directory in the session's TMPDIR, a segment with the session's prefix in /dev/shm, or a
``gwtest_*`` schema this session created (tests/support/postgres.py) fails the run. The session's directory is
removed after a passing run, and kept (its path printed) after a failing one, for the failed tests' tmp_path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tests.support.blocking import LIMIT_MS

SHM_DIR = Path("/dev/shm")
# One prefix per test session (the settings allow 16 characters). Named here, not in the environment only, so
# that in-process settings and the checks agree.
SHM_PREFIX = f"gwt{os.getpid() % 0xFFFFFF:06x}"


class Session:
    """This session's temporary directory for child processes; create with ``start()``."""

    def __init__(self) -> None:
        self.tmp: Path | None = None

    def start(self) -> None:
        # The session's own process keeps the real temporary directory: fix it before TMPDIR changes, so that
        # tempfile (pytest's base temp, multiprocessing) does not follow the variable.
        tempfile.tempdir = tempfile.gettempdir()
        # Short: multiprocessing puts a Unix socket inside (pymp-*/listener-*), and those paths are limited to
        # 107 bytes.
        self.tmp = Path(tempfile.mkdtemp(prefix="gwtest-"))
        os.environ["TMPDIR"] = str(self.tmp)
        os.environ["GATEWAY_COMPUTE__SHM_PREFIX"] = SHM_PREFIX
        # Every `gateway serve` reports a blocked loop at the suite's limit (tests/support/blocking.py).
        os.environ["GATEWAY_OBSERVABILITY__BLOCKING_THRESHOLD_MS"] = str(LIMIT_MS)

    def leftovers(self) -> list[str]:
        """What child processes of this session left in its TMPDIR and in /dev/shm."""
        found = [str(p) for p in sorted(self.tmp.glob("pymp-*"))] if self.tmp is not None else []
        if SHM_DIR.is_dir():
            found += [str(p) for p in sorted(SHM_DIR.glob(f"{SHM_PREFIX}*"))]
        return found

    def clean(self, *, keep_tmp: bool) -> None:
        """Remove what ``leftovers()`` named, and the session's TMPDIR unless ``keep_tmp``."""
        if self.tmp is not None:
            if keep_tmp:
                for path in self.tmp.glob("pymp-*"):
                    shutil.rmtree(path, ignore_errors=True)
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
        if SHM_DIR.is_dir():
            for path in SHM_DIR.glob(f"{SHM_PREFIX}*"):
                path.unlink(missing_ok=True)


SESSION = Session()
