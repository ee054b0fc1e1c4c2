"""Fixtures shared by every test: real PostgreSQL, real upstream servers, the real app."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.demo.postgres import load_demo_seed
from tests.support.postgres import isolated_schema, server_url
from tests.support.upstream import UpstreamServer


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
