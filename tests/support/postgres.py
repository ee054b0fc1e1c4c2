"""A PostgreSQL database for the test session: the one named by GATEWAY_TEST_DATABASE_URL (by default the local
`test` database), isolated in a fresh schema that is dropped afterwards. Only with the variable unset and no
server answering on the default URL is the embedded server that `gateway demo` uses started instead.

No connection is held for the session: the schema is dropped through a new one, retried until a deadline, so a
server restarted during the run (by a test, an operator, a CI service) still has it dropped. ``left_schemas()``
says which of this session's schemas a server still has, for the check at the end of the run."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterator
from urllib.parse import quote

import psycopg2

DEFAULT_TEST_URL = "postgresql://postgres@127.0.0.1:5432/test"
# How long a schema's drop keeps trying to reach the server: a restart takes a few seconds, a loaded CI box more.
DROP_WITHIN_S = 30.0
# This session's schemas on servers that outlive it (not the embedded one, whose data directory goes with it).
_created: dict[str, str] = {}
_embedded: set[str] = set()


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
        _embedded.add(pg.dsn)
        yield pg.dsn


@contextlib.contextmanager
def isolated_schema(
    url: str, seed_sql: str, *, drop_within: float = DROP_WITHIN_S, tracked: bool = True
) -> Iterator[str]:
    """Create a fresh schema, seed it, yield a DSN whose search_path points at it, and drop it afterwards,
    reconnecting for the drop (for up to ``drop_within`` seconds). Raises psycopg2.OperationalError when the
    server cannot be reached to drop it within that time. ``tracked``: checked at the end of the run (not for a
    throwaway server that will be gone by then)."""
    schema = f"gwtest_{secrets.token_hex(4)}"
    if tracked and url not in _embedded:
        _created[schema] = url
    try:
        with contextlib.closing(psycopg2.connect(url)) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"CREATE SCHEMA {schema}")
                cur.execute(f"SET search_path = {schema}")
                cur.execute(seed_sql)
        yield with_search_path(url, schema)
    finally:
        drop_schema(url, schema, within=drop_within)


def drop_schema(url: str, schema: str, *, within: float) -> None:
    """DROP SCHEMA through a new connection, retried while the server does not answer (restarting) or a lock
    is not granted in time, for up to ``within`` seconds. Raises the last psycopg2.OperationalError."""
    deadline = time.monotonic() + within
    while True:
        try:
            with contextlib.closing(psycopg2.connect(url, connect_timeout=3)) as conn:
                conn.autocommit = True
                with conn.cursor() as cur:
                    # A gateway left holding a lock must not hold the teardown for ever: retried instead.
                    cur.execute("SET lock_timeout = '5s'")
                    cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            return
        except psycopg2.OperationalError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def left_schemas() -> dict[str, str]:
    """This session's schemas that their server still has (schema -> server URL); a server that cannot be
    reached is reported as ``unreachable`` for each of its schemas."""
    left: dict[str, str] = {}
    for url in set(_created.values()):
        names = [schema for schema, where in _created.items() if where == url]
        try:
            with contextlib.closing(psycopg2.connect(url, connect_timeout=3)) as conn, conn.cursor() as cur:
                cur.execute("SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)", (names,))
                left.update({row[0]: url for row in cur.fetchall()})
        except psycopg2.OperationalError:
            left.update(dict.fromkeys(names, f"{url} (unreachable)"))
    return left


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
