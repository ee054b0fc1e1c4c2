"""A PostgreSQL database for the test session: the one named by GATEWAY_TEST_DATABASE_URL (by default the local
`test` database), isolated in a fresh schema that is dropped afterwards. On a machine with no PostgreSQL at all,
the embedded server that `gateway demo` uses is started instead."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from urllib.parse import quote

import psycopg2

DEFAULT_TEST_URL = "postgresql://postgres@127.0.0.1:5432/test"


def _reachable(dsn: str) -> bool:
    try:
        psycopg2.connect(dsn, connect_timeout=3).close()
    except psycopg2.OperationalError:
        return False
    return True


def with_search_path(dsn: str, schema: str) -> str:
    sep = "&" if "?" in dsn else "?"
    return f"{dsn}{sep}options={quote(f'-csearch_path={schema}')}"


@contextlib.contextmanager
def server_url() -> Iterator[str]:
    """The URL of a reachable server: the configured one, or an embedded one when none was configured."""
    explicit = os.environ.get("GATEWAY_TEST_DATABASE_URL")
    url = explicit or DEFAULT_TEST_URL
    if _reachable(url):
        yield url
        return
    if explicit:
        raise RuntimeError(f"GATEWAY_TEST_DATABASE_URL={explicit} is not reachable")
    from app.demo.postgres import EmbeddedPostgres

    with EmbeddedPostgres() as pg:
        yield pg.dsn


@contextlib.contextmanager
def isolated_schema(url: str, seed_sql: str) -> Iterator[str]:
    """Create a fresh schema, seed it, yield a DSN whose search_path points at it, and drop it afterwards."""
    schema = f"gwtest_{secrets.token_hex(4)}"
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE SCHEMA {schema}")
            cur.execute(f"SET search_path = {schema}")
            cur.execute(seed_sql)
        yield with_search_path(url, schema)
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        conn.close()


def active_gateway_queries(dsn: str, marker: str = "") -> int:
    """Queries of the gateway (application_name 'gateway') running on the server now; with ``marker``, only those
    whose text holds it (on a server that other test runs share, a test counts only its own queries)."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'gateway' AND state = 'active'"
                " AND strpos(query, %s) > 0",
                (marker,),
            )
            row = cur.fetchone()
            assert row is not None
            return int(row[0])
    finally:
        conn.close()
