"""The service store: SQLite inline on the event loop, PostgreSQL through a pool."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError

from infra.db import Database, fast


@pytest.fixture
async def sqlite_db(tmp_path):
    db = Database.for_service("store_test", data_dir=tmp_path)
    async with db.transaction() as conn:
        await conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
    yield db
    await db.close()


async def _rows(db: Database) -> list[tuple[int, str]]:
    async with db.transaction() as conn:
        return [tuple(r) for r in (await conn.exec_driver_sql("SELECT id, v FROM t ORDER BY id"))]


async def test_sqlite_commits_and_rolls_back_whole_transactions(sqlite_db: Database) -> None:
    async with sqlite_db.transaction() as conn:
        await conn.exec_driver_sql("INSERT INTO t VALUES (1, 'kept')")
    with pytest.raises(RuntimeError):
        async with sqlite_db.transaction() as conn:
            await conn.exec_driver_sql("INSERT INTO t VALUES (2, 'undone')")
            raise RuntimeError("the unit of work failed")
    with pytest.raises(IntegrityError):
        async with sqlite_db.transaction() as conn:
            await conn.exec_driver_sql("INSERT INTO t VALUES (3, 'undone too')")
            await conn.exec_driver_sql("INSERT INTO t VALUES (1, 'duplicate key')")
    assert await _rows(sqlite_db) == [(1, "kept")]


async def test_sqlite_transactions_of_concurrent_tasks_do_not_interleave(
    sqlite_db: Database,
) -> None:
    async def read_modify_write(i: int) -> None:
        async with sqlite_db.transaction() as conn:
            count = (await conn.exec_driver_sql("SELECT COUNT(*) FROM t")).scalar_one()
            await asyncio.sleep(0)  # another task runs here; it must not enter this transaction
            await conn.exec_driver_sql("INSERT INTO t VALUES (?, ?)", (count + 1, f"task {i}"))

    await asyncio.gather(*(read_modify_write(i) for i in range(50)))
    assert [row[0] for row in await _rows(sqlite_db)] == list(range(1, 51))


async def test_a_loop_of_sqlite_transactions_lets_other_tasks_run(sqlite_db: Database) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    for i in range(100):
        async with sqlite_db.transaction() as conn:
            await conn.exec_driver_sql("INSERT INTO t VALUES (?, 'x')", (i,))
    task.cancel()
    assert ticks >= 50  # the ticker ran between the transactions (without the yield: 0)


async def test_a_new_sqlite_store_has_16_kib_pages_and_an_old_one_keeps_its_own(
    tmp_path,
) -> None:
    old_path = tmp_path / "old_test.db"
    made = sqlite3.connect(old_path)  # a file made before the pragma: 4 KiB pages, WAL
    made.execute("PRAGMA journal_mode=WAL")
    made.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
    made.close()
    new = Database.for_service("new_test", data_dir=tmp_path)
    old = Database.for_service("old_test", data_dir=tmp_path)
    try:
        for db in (new, old):
            async with db.transaction() as conn:
                await conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY,"
                                           " v TEXT NOT NULL)")
                await conn.exec_driver_sql("INSERT INTO t VALUES (1, 'x')")
        assert await _rows(old) == [(1, "x")] == await _rows(new)
    finally:
        await new.close()
        await old.close()
    page_size = {name: sqlite3.connect(tmp_path / f"{name}.db").execute(
        "PRAGMA page_size").fetchone()[0] for name in ("new_test", "old_test")}
    assert page_size == {"new_test": 16384, "old_test": 4096}


async def test_sqlite_data_is_in_the_file_for_other_processes(
    sqlite_db: Database, tmp_path
) -> None:
    async with sqlite_db.transaction() as conn:
        await conn.exec_driver_sql("INSERT INTO t VALUES (7, 'visible')")
    other = sqlite3.connect(tmp_path / "store_test.db")
    try:
        assert other.execute("SELECT v FROM t WHERE id = 7").fetchall() == [("visible",)]
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        other.close()


@pytest.mark.postgres
async def test_postgres_store_recovers_after_its_connections_are_killed(
    pg_url: str, unique: str
) -> None:
    db = Database(pg_url, schema=f"store_{unique}")
    admin = Database(pg_url)
    try:
        await db.ensure_schema()
        async with db.transaction() as conn:  # the pool's one connection so far
            await conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY)")
            backend = (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one()
        async with admin.transaction() as conn:
            killed = (await conn.exec_driver_sql(
                f"SELECT pg_terminate_backend({int(backend)})")).scalar_one()
        assert killed is True
        # the first unit of work on the dead connection fails as a disconnect ...
        with pytest.raises(DBAPIError) as failure:
            async with db.transaction() as conn:
                await conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        assert failure.value.connection_invalidated
        # ... and the next one, retried as any failed delivery is, runs on a new connection
        async with db.transaction() as conn:
            await conn.exec_driver_sql("INSERT INTO t VALUES (1)")
            assert (await conn.exec_driver_sql("SELECT COUNT(*) FROM t")).scalar_one() == 1
    finally:
        await db.drop_schema()
        await db.close()
        await admin.close()


async def test_fast_statements_join_the_transaction_and_raise_sqlalchemy_errors(
    sqlite_db: Database,
) -> None:
    with pytest.raises(RuntimeError):
        async with sqlite_db.transaction() as conn:
            await fast.execute(conn, "INSERT INTO t VALUES (?, ?)", (1, "raw"))
            await conn.exec_driver_sql("INSERT INTO t VALUES (2, 'engine')")
            assert await fast.fetch(conn, "SELECT id, v FROM t ORDER BY id") == [
                (1, "raw"), (2, "engine")]
            raise RuntimeError("roll both back")
    assert await _rows(sqlite_db) == []
    await _a_broken_key_fails_without_its_parameters(sqlite_db)


async def _a_broken_key_fails_without_its_parameters(db: Database) -> None:
    with pytest.raises(IntegrityError) as failure:
        async with db.transaction() as conn:
            await fast.execute_many(conn, "INSERT INTO t VALUES (?, ?)",
                                    [(5, "a secret body"), (5, "a secret body")])
    assert "secret" not in str(failure.value)  # parameters never in the error's text
    assert await _rows(db) == []


@pytest.fixture
async def pg_db(pg_url: str, unique: str):
    db = Database(pg_url, schema=f"fast_{unique}")
    await db.ensure_schema()
    async with db.transaction() as conn:
        await conn.exec_driver_sql("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
    yield db
    await db.drop_schema()
    await db.close()


@pytest.mark.postgres
async def test_fast_statements_on_postgresql_run_inside_the_transaction(pg_db: Database) -> None:
    # a raw statement first: it must not run before SQLAlchemy's BEGIN, i.e. autocommitted
    with pytest.raises(RuntimeError):
        async with pg_db.transaction() as conn:
            assert await fast.execute(conn, "INSERT INTO t VALUES (?, ?)", (1, "raw")) == 1
            await conn.exec_driver_sql("INSERT INTO t VALUES (2, 'engine')")
            await fast.execute_many(conn, "INSERT INTO t VALUES (?, ?)", [(3, "x"), (4, "y")])
            assert [tuple(r) for r in await fast.fetch(conn, "SELECT id, v FROM t ORDER BY id")
                    ] == [(1, "raw"), (2, "engine"), (3, "x"), (4, "y")]
            raise RuntimeError("roll all of it back")
    assert await _rows(pg_db) == []
    async with pg_db.transaction() as conn:
        await fast.execute_many(conn, "INSERT INTO t VALUES (?, ?)", [(1, "a"), (2, "b")])
        assert await fast.execute(conn, "UPDATE t SET v = ? WHERE id > ?", ("c", 0)) == 2
    assert await _rows(pg_db) == [(1, "c"), (2, "c")]


@pytest.mark.postgres
async def test_fast_statements_on_postgresql_raise_sqlalchemy_errors(pg_db: Database) -> None:
    await _a_broken_key_fails_without_its_parameters(pg_db)


@pytest.mark.postgres
async def test_a_fast_statement_on_a_killed_connection_fails_as_a_disconnect(
    pg_db: Database, pg_url: str
) -> None:
    admin = Database(pg_url)
    try:
        async with pg_db.transaction() as conn:  # the pool's one connection so far
            backend = (await fast.fetch(conn, "SELECT pg_backend_pid()"))[0][0]
        async with admin.transaction() as conn:
            await conn.exec_driver_sql(f"SELECT pg_terminate_backend({int(backend)})")
        with pytest.raises(DBAPIError) as failure:
            async with pg_db.transaction() as conn:
                await fast.execute(conn, "INSERT INTO t VALUES (?, ?)", (1, "lost"))
        assert failure.value.connection_invalidated
        # the dead connection left the pool: the next unit of work runs on a new one
        async with pg_db.transaction() as conn:
            await fast.execute(conn, "INSERT INTO t VALUES (?, ?)", (1, "kept"))
        assert await _rows(pg_db) == [(1, "kept")]
    finally:
        await admin.close()
