import socket
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import psutil
import psycopg2
import pytest

from app.demo.postgres import EmbeddedPostgres, EmbeddedPostgresError, load_demo_seed, seed

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pg() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres() as server:
        yield server


def query_one(dsn: str, sql: str) -> tuple[object, ...]:
    with closing(psycopg2.connect(dsn)) as conn, conn.cursor() as cur:
        cur.execute(sql)
        row = cur.fetchone()
    assert row is not None
    return row


def postgres_children() -> list[psutil.Process]:
    children: list[psutil.Process] = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.name() == "postgres":
                children.append(child)
        except psutil.NoSuchProcess:
            pass
    return children


def test_start_accepts_connections(pg: EmbeddedPostgres) -> None:
    assert pg.running
    assert pg.dsn == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
    assert query_one(pg.dsn, "select 1") == (1,)


def test_seed_demo_data(pg: EmbeddedPostgres) -> None:
    # Twice: the script must be idempotent.
    seed(pg.dsn, load_demo_seed())
    seed(pg.dsn, load_demo_seed())

    assert query_one(pg.dsn, "select count(*) from users") == (20,)
    assert query_one(pg.dsn, "select count(*), count(distinct user_id) from orders") == (100, 20)
    index_sql = "select indexdef from pg_indexes where tablename = 'orders' and indexname <> 'orders_pkey'"
    (indexdef,) = query_one(pg.dsn, index_sql)
    assert isinstance(indexdef, str)
    assert indexdef.endswith("(user_id, created_at DESC)")


def test_stop_then_start_keeps_data(pg: EmbeddedPostgres) -> None:
    seed(pg.dsn, "create table marker (value text); insert into marker values ('kept')")
    dsn = pg.dsn

    pg.stop()
    assert not pg.running
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(dsn, connect_timeout=2)
    pg.stop()  # idempotent

    pg.start()
    assert pg.running
    assert pg.dsn == dsn
    assert query_one(dsn, "select value from marker") == ("kept",)


def test_close_leaves_no_process_and_removes_temp_dir() -> None:
    pg = EmbeddedPostgres()
    pg.start()
    base_dir = pg.base_dir
    # A live connection, so there is a backend for the shutdown to end too.
    with closing(psycopg2.connect(pg.dsn)):
        assert postgres_children()
        assert base_dir.is_dir()

        pg.close()

    assert postgres_children() == []
    assert not base_dir.exists()
    assert not pg.running
    pg.close()  # idempotent
    with pytest.raises(EmbeddedPostgresError):
        pg.start()


def test_given_base_dir_is_kept_and_reused(tmp_path: Path) -> None:
    base_dir = tmp_path / "pg"
    with EmbeddedPostgres(base_dir=base_dir) as first:
        seed(first.dsn, "create table marker (value text); insert into marker values ('kept')")
    assert (base_dir / "data" / "PG_VERSION").is_file()

    # A new instance on the same directory starts the existing cluster instead of running initdb.
    with EmbeddedPostgres(base_dir=base_dir) as second:
        assert query_one(second.dsn, "select value from marker") == ("kept",)
    assert base_dir.is_dir()
    assert postgres_children() == []


def test_start_failure_reports_server_log(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        pg = EmbeddedPostgres(port=taken.getsockname()[1], base_dir=tmp_path / "pg")
        try:
            with pytest.raises(EmbeddedPostgresError, match="could not bind"):
                pg.start()
            assert not pg.running
        finally:
            pg.close()
    assert postgres_children() == []
