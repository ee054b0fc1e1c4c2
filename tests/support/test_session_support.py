"""The session's own support: the database schema survives a server restart, and what a killed child leaves
behind is found."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from app.demo.postgres import EmbeddedPostgres
from tests.support.postgres import isolated_schema
from tests.support.session import SESSION


@pytest.fixture
def pg() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres() as server:
        yield server


def schemas(dsn: str) -> set[str]:
    with contextlib.closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'gwtest_%'")
        return {row[0] for row in cur.fetchall()}


@pytest.mark.slow
def test_the_schema_is_dropped_after_a_server_restart(pg: EmbeddedPostgres) -> None:
    # The server goes down during the session and comes back while the teardown already tries to drop the schema:
    # the drop reconnects and retries until it answers.
    with isolated_schema(pg.dsn, "CREATE TABLE t (id int)", tracked=False) as dsn:
        assert len(schemas(dsn)) == 1
        pg.stop()
        # Down for the first attempts of the drop: this delay is the outage under test.
        restart = threading.Timer(1.0, pg.start)
        restart.start()
    restart.join()
    assert schemas(pg.dsn) == set()


def test_a_killed_childs_multiprocessing_directory_is_found() -> None:
    # A child of the session (it inherits the session's TMPDIR) creates multiprocessing's temporary directory and
    # is SIGKILLed, so its own clean-up never runs: the end-of-run check names the directory.
    assert SESSION.tmp is not None
    assert os.environ["TMPDIR"] == str(SESSION.tmp)
    code = (
        "import os, signal; from multiprocessing import util; "
        "print(util.get_temp_dir(), flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False)
    assert run.returncode == -signal.SIGKILL
    left = Path(run.stdout.strip())
    try:
        assert left.parent == SESSION.tmp
        assert str(left) in SESSION.leftovers()
    finally:
        shutil.rmtree(left)
    assert str(left) not in SESSION.leftovers()
