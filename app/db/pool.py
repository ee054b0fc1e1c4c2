"""PostgreSQL through psycopg2: a ThreadedConnectionPool sized to the DB executor, queries run only there."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from psycopg2.pool import ThreadedConnectionPool

from app.concurrency import run_in_own_thread
from app.db.executor import BoundedExecutor, ExecutorFullError, ExecutorObserver
from app.errors import (
    DatabaseError,
    DatabaseUnavailableError,
    QueryTimeoutError,
    ResourceClosedError,
    SourceError,
    SourceOverloadedError,
    StartupError,
)
from app.settings import DatabaseSettings

log = logging.getLogger(__name__)

Row = dict[str, Any]


@dataclass(frozen=True)
class QueryResult:
    rows: list[Row]
    truncated: bool
    elapsed_ms: float


class Database:
    """A psycopg2 connection pool whose every call runs in its own bounded thread executor.

    The pool holds as many connections as the executor has threads, so a thread always finds one and psycopg2's
    PoolError (it never waits) cannot happen.
    """

    def __init__(
        self,
        dsn: str,
        settings: DatabaseSettings,
        *,
        observer: ExecutorObserver | None = None,
        on_query: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self._dsn = dsn
        self._settings = settings
        self._on_query = on_query
        self._executor = BoundedExecutor(
            name="db", workers=settings.executor_threads, queue_limit=settings.queue_limit, observer=observer
        )
        self._canceller = BoundedExecutor(name="db-cancel", workers=2, queue_limit=settings.executor_threads)
        self._pool: ThreadedConnectionPool | None = None
        self._closed = False
        self._running: set[_Job] = set()
        self._running_lock = threading.Lock()

    @property
    def executor(self) -> BoundedExecutor:
        return self._executor

    @property
    def pool_size(self) -> int:
        return self._executor.workers

    async def start(self) -> None:
        """Create the pool and open ``min_connections``.

        Raises StartupError when ``startup_check`` is on and the database cannot be reached.
        """
        self._pool = ThreadedConnectionPool(
            0,
            self.pool_size,
            self._dsn,
            connect_timeout=max(1, round(self._settings.connect_timeout_s)),
            application_name="gateway",
        )
        # psycopg2 closes every connection returned beyond `minconn`; raising it after construction keeps every
        # healthy connection (opened lazily) instead of opening and closing one per query under bursts.
        self._pool.minconn = self.pool_size
        try:
            await self._executor.run(self._warm)
        except psycopg2.Error as exc:
            if self._settings.startup_check:
                raise StartupError(f"database unreachable: {_one_line(exc)}") from exc
            log.warning("database unreachable at start-up, continuing: %s", _one_line(exc))

    def _warm(self) -> None:
        pool = self._require_pool()
        conns = []
        try:
            for _ in range(max(1, self._settings.min_connections)):
                conn = pool.getconn()
                conns.append(conn)
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                conn.rollback()
        finally:
            for conn in conns:
                pool.putconn(conn, close=not self._settings.min_connections)

    async def fetch(
        self,
        sql: str,
        params: Mapping[str, Any],
        *,
        timeout_ms: float,
        max_rows: int,
        name: str = "adhoc",
        on_sent: Callable[[], None] | None = None,
    ) -> QueryResult:
        """Run one parameterised query in the DB executor. ``on_sent`` is called (in the executor's thread) each
        time the query goes to the server; a query dropped from the queue or refused never calls it.

        Raises SourceOverloadedError when the executor queue is full, DatabaseUnavailableError when no connection
        can be had, QueryTimeoutError when statement_timeout cancels it, DatabaseError for any other failure.
        When the awaiting coroutine is cancelled (deadline, client gone), a queued query is dropped and a running
        one is cancelled on the server, so no query outlives its request.
        """
        if self._closed:
            raise ResourceClosedError("database is closed")
        job = _Job()
        started = time.perf_counter()
        outcome = "ok"
        try:
            try:
                future = self._executor.submit(lambda: self._fetch(job, sql, params, timeout_ms, max_rows, on_sent))
            except ExecutorFullError as exc:
                raise SourceOverloadedError("database executor queue is full") from exc
            try:
                # Cancelling this await cancels a job that has not started (its queue slot frees at once); a
                # running job goes on in its thread, so the server-side cancel below is what stops it.
                return await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                outcome = "cancelled"
                self._cancel_on_server(job)
                raise
        except SourceError as err:
            outcome = err.kind
            raise
        finally:
            if self._on_query is not None:
                self._on_query(name, outcome, time.perf_counter() - started)

    def _cancel_on_server(self, job: _Job) -> None:
        with job.lock:
            job.cancelled = True
            if job.conn is None:
                return
        try:
            # connection.cancel() is a blocking network round trip: never on the loop, and not in the query
            # executor, whose threads may all be busy with the very queries to cancel.
            self._canceller.submit(lambda: _cancel_if_owned(job))
        except (ExecutorFullError, ResourceClosedError):
            log.warning("query cancel skipped: canceller busy; statement_timeout will end the query")

    def _fetch(
        self,
        job: _Job,
        sql: str,
        params: Mapping[str, Any],
        timeout_ms: float,
        max_rows: int,
        on_sent: Callable[[], None] | None,
    ) -> QueryResult:
        started = time.perf_counter()
        # A connection that died while idle in the pool (server restart) fails on first use; an idempotent read
        # is retried once on a fresh connection.
        for attempt in (1, 2):
            conn = self._getconn()
            with job.lock:
                if job.cancelled:
                    self._putconn(conn, close=False)
                    raise QueryTimeoutError("query cancelled before it started")
                job.conn = conn
            discard = False
            with self._running_lock:
                self._running.add(job)
            try:
                with conn.cursor() as cur:
                    cur.execute("SET LOCAL statement_timeout = %s", (max(1, int(timeout_ms)),))
                    if on_sent is not None:
                        on_sent()
                    cur.execute(sql, params)
                    rows = _rows(cur, max_rows + 1) if cur.description is not None else []
                conn.commit()
                truncated = len(rows) > max_rows
                elapsed = (time.perf_counter() - started) * 1000
                return QueryResult(rows=rows[:max_rows], truncated=truncated, elapsed_ms=elapsed)
            except psycopg2.errors.QueryCanceled as exc:
                _rollback(conn)
                raise QueryTimeoutError(f"query exceeded {timeout_ms:.0f} ms") from exc
            except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
                discard = True
                if attempt == 1 and _connection_lost(conn):
                    # After a server restart every idle pooled connection is dead too: drop them all.
                    self._purge_idle()
                    continue
                log.warning("database connection failed: %s", _one_line(exc))
                raise DatabaseUnavailableError("database connection failed") from exc
            except psycopg2.Error as exc:
                discard = _rollback(conn) is False
                raise DatabaseError(f"query failed: {_server_message(exc)}") from exc
            finally:
                # Detach under the lock first: a late cancel must never hit the next query on this connection.
                with job.lock:
                    job.conn = None
                with self._running_lock:
                    self._running.discard(job)
                self._putconn(conn, close=discard or bool(conn.closed))
        raise AssertionError("unreachable")

    def running(self) -> list[_Job]:
        """The queries running now: a snapshot, cheap enough for the loop."""
        with self._running_lock:
            return list(self._running)

    def cancel_running(self, jobs: list[_Job] | None = None) -> int:
        """Ask the server to cancel ``jobs`` (a snapshot from running(); default: every query running now);
        returns how many. Blocking (one short connection to the server per query still running): call it off the
        loop. Used when the drain timeout passes, so that queries whose requests were cancelled do not hold the
        executor's close until their own statement timeout."""
        if jobs is None:
            jobs = self.running()
        for job in jobs:
            with job.lock:
                job.cancelled = True
            _cancel_if_owned(job)  # checks, under the job's lock, that the connection still runs this job
        return len(jobs)

    def _getconn(self) -> psycopg2.extensions.connection:
        try:
            conn: psycopg2.extensions.connection = self._require_pool().getconn()
        except psycopg2.pool.PoolError as exc:
            raise DatabaseUnavailableError(f"connection pool: {exc}") from exc
        except psycopg2.OperationalError as exc:
            # The driver's text names the server's host and port: the log gets it, the client does not.
            log.warning("cannot connect to the database: %s", _one_line(exc))
            raise DatabaseUnavailableError("cannot connect to the database") from exc
        return conn

    def _putconn(self, conn: psycopg2.extensions.connection, *, close: bool) -> None:
        pool = self._pool
        if pool is None or pool.closed:
            conn.close()
            return
        pool.putconn(conn, close=close)

    def _purge_idle(self) -> None:
        pool = self._pool
        if pool is None or pool.closed:
            return
        # psycopg2 offers no API for this; its idle list and lock are stable across its 2.x releases.
        with pool._lock:  # type: ignore[attr-defined]
            idle: list[psycopg2.extensions.connection] = list(pool._pool)  # type: ignore[attr-defined]
            pool._pool.clear()  # type: ignore[attr-defined]
        for conn in idle:
            conn.close()

    def _require_pool(self) -> ThreadedConnectionPool:
        if self._pool is None or self._closed:
            raise ResourceClosedError("database pool is not open")
        return self._pool

    def pool_stats(self) -> dict[str, int]:
        pool = self._pool
        if pool is None or pool.closed:
            return {"size": self.pool_size, "in_use": 0, "idle": 0}
        # psycopg2 exposes no accessors; these private lists are stable across its 2.x releases.
        in_use: int = len(pool._used)  # type: ignore[attr-defined]
        idle: int = len(pool._pool)  # type: ignore[attr-defined]
        return {"size": self.pool_size, "in_use": in_use, "idle": idle}

    async def aclose(self) -> None:
        """Let running queries finish (queued ones are dropped), then close every pooled connection."""
        if self._closed:
            return
        self._closed = True
        await self._executor.aclose()
        await self._canceller.aclose()
        pool = self._pool
        if pool is not None and not pool.closed:
            await run_in_own_thread(pool.closeall, name="db-pool-close")


@dataclass(eq=False)  # identity semantics: jobs live in a set
class _Job:
    """One query's link between the awaiting coroutine and the thread running it."""

    conn: psycopg2.extensions.connection | None = None
    cancelled: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


def _cancel_if_owned(job: _Job) -> None:
    with job.lock:
        if job.conn is not None:
            try:
                job.conn.cancel()
            except psycopg2.Error as exc:
                log.warning("query cancel failed: %s", _one_line(exc))


def _rows(cur: psycopg2.extensions.cursor, limit: int) -> list[Row]:
    names = [col.name for col in cur.description or ()]
    return [dict(zip(names, values, strict=True)) for values in cur.fetchmany(limit)]


def _rollback(conn: psycopg2.extensions.connection) -> bool:
    try:
        conn.rollback()
    except psycopg2.Error:
        return False
    return True


def _connection_lost(conn: psycopg2.extensions.connection) -> bool:
    return bool(conn.closed) or conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_UNKNOWN


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _server_message(exc: psycopg2.Error) -> str:
    # The server's own primary message and SQLSTATE: what went wrong, without the driver's connection details.
    primary = exc.diag.message_primary if exc.diag is not None else None
    if primary:
        return f"{primary} (SQLSTATE {exc.pgcode})" if exc.pgcode else primary
    return type(exc).__name__
