"""Fixtures shared by every test: real PostgreSQL, real upstream servers, the real app; and the session's check
that nothing was left behind (tests/support/session.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.demo.postgres import load_demo_seed
from tests.support.blocking import loop_never_blocked  # noqa: F401  (autouse: every test)
from tests.support.postgres import isolated_schema, left_schemas, server_url
from tests.support.session import SESSION
from tests.support.upstream import UpstreamServer

_left_behind: list[str] = []


# First: before pytest's tmpdir plugin reads --basetemp.
@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    SESSION.start()
    assert SESSION.tmp is not None
    if config.option.basetemp is None:
        config.option.basetemp = str(SESSION.tmp / "pytest")


# Last: after the runner's own pytest_sessionfinish, which tears down what is still set up (after -x, say).
@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if it left a multiprocessing directory, a shared-memory segment or a schema behind; the
    directories and segments are removed either way (once named), so nothing piles up."""
    _left_behind.extend(SESSION.leftovers())
    _left_behind.extend(f"schema {schema} on {url}" for schema, url in left_schemas().items())
    if _left_behind and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    SESSION.clean(keep_tmp=session.exitstatus != pytest.ExitCode.OK)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int) -> None:
    if SESSION.tmp is not None and SESSION.tmp.exists():
        terminalreporter.line(f"the failed tests' tmp_path are kept in {SESSION.tmp}")
    if _left_behind:
        terminalreporter.section("left behind by this run (fails it)", red=True)
        for entry in _left_behind:
            terminalreporter.line(entry)


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    with server_url() as url:
        yield url


@pytest.fixture(scope="session")
def pg_dsn(pg_server_url: str) -> Iterator[str]:
    """A DSN whose search_path is a fresh schema seeded with the demo data; dropped after the session."""
    with isolated_schema(pg_server_url, load_demo_seed()) as dsn:
        yield dsn


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer("upstream") as server:
        yield server


@pytest.fixture
def upstream2() -> Iterator[UpstreamServer]:
    with UpstreamServer("upstream2") as server:
        yield server
