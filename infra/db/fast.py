"""Hot-path statements as driver SQL, for the few statements run for every message.

SQLAlchemy Core's per-row parameter processing costs more CPU than SQLite's own work at
thousands of rows a second, so the statements every message runs (inbox, outbox,
timeline, saga state, timers) are written once as SQL with ``?`` placeholders, turned into
``$n`` for asyncpg, and executed with plain tuples. The SQL
is the common subset of SQLite and PostgreSQL (``ON CONFLICT``, ``RETURNING``); the tables
are the ones the migrations create, unqualified (PostgreSQL resolves them through the
connection's ``search_path``).

On the inline SQLite driver the statements go straight to the ``sqlite3`` connection under
the transaction SQLAlchemy opened: exec_driver_sql's own work per statement (execution
context, cursor adapter, result wrapper) cost several times what SQLite spends. The rows
come back as plain tuples (read by position, as every caller does) and SQLite's errors
are raised as SQLAlchemy's, as through the engine.

On PostgreSQL they go the same way to the asyncpg connection, inside the transaction
SQLAlchemy opened on it (asyncpg's own statement cache prepares each once per connection):
in alternated runs of ``jpki bench issuance --services real`` the process used about 2 ms
less CPU per issuance (19.4 against 21.6 ms, two pairs of three; the third even). Rows
come back as asyncpg records, read by position like tuples; asyncpg's errors are raised as
SQLAlchemy's, and a lost connection is invalidated as the engine does.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import asyncpg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from infra.db.inline_sqlite import InlineConnection

_PLACEHOLDER = re.compile(r"\?")


@functools.lru_cache(maxsize=512)
def for_dialect(sql: str, dialect: str) -> str:
    """``?`` placeholders for SQLite, ``$1, $2, ...`` for PostgreSQL (asyncpg)."""
    if dialect != "postgresql":
        return sql
    counter = iter(range(1, 1_000_000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


def _inline_sqlite(conn: AsyncConnection) -> sqlite3.Connection | None:
    if conn.dialect.name != "sqlite":
        return None
    driver = conn.sync_connection.connection.driver_connection  # type: ignore[union-attr]
    return driver._conn if isinstance(driver, InlineConnection) else None


@contextlib.contextmanager
def _as_sqlalchemy_errors(sql: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        # parameters left out: they may carry message bodies (the engine hides them too)
        raise DBAPIError.instance(sql, None, exc, sqlite3.Error, hide_parameters=True) from exc


async def _asyncpg(conn: AsyncConnection) -> asyncpg.Connection:
    """The asyncpg connection under ``conn``, inside the transaction SQLAlchemy began.

    SQLAlchemy's asyncpg adapter sends BEGIN lazily, with the first statement it runs
    itself; a statement sent straight to asyncpg before that would run outside the
    transaction, so the adapter is asked to begin first (``_start_transaction`` is what
    its own cursor calls; ``tests/infra/test_database.py`` holds it to this)."""
    adapter = conn.sync_connection.connection.dbapi_connection  # type: ignore[union-attr]
    if adapter._transaction is None:  # under autocommit it returns at once
        await adapter._start_transaction()
    return adapter._connection


@contextlib.asynccontextmanager
async def _as_sqlalchemy_errors_pg(conn: AsyncConnection, sql: str) -> AsyncIterator[None]:
    """asyncpg's errors raised as SQLAlchemy raises them through the engine; a lost
    connection is invalidated, so the pool opens a new one for the next unit of work."""
    dbapi = conn.dialect.loaded_dbapi
    try:
        yield
    except (dbapi.Error, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        error = exc
        adapter = conn.sync_connection.connection.dbapi_connection  # type: ignore[union-attr]
        if not isinstance(exc, dbapi.Error):
            try:
                adapter._handle_exception(exc)  # raises asyncpg's error as the DBAPI's
            except dbapi.Error as translated:
                error = translated
        lost = conn.dialect.is_disconnect(error, adapter, None)
        wrapped = DBAPIError.instance(  # parameters left out: they may carry message bodies
            sql, None, error, dbapi.Error, hide_parameters=True, connection_invalidated=lost)
        if lost:
            await conn.invalidate(wrapped)
        raise wrapped from exc


def _rows_changed(status: str) -> int:
    """The count at the end of a PostgreSQL command tag (``UPDATE 3``, ``INSERT 0 1``)."""
    tail = status.rpartition(" ")[2]
    return int(tail) if tail.isdigit() else -1


async def execute(conn: AsyncConnection, sql: str, params: tuple[Any, ...] = ()) -> int:
    """Run ``sql`` once; returns the rows changed."""
    raw = _inline_sqlite(conn)
    if raw is not None:
        with _as_sqlalchemy_errors(sql):
            return raw.execute(sql, params).rowcount
    if conn.dialect.driver != "asyncpg":
        return (await conn.exec_driver_sql(for_dialect(sql, conn.dialect.name), params)).rowcount
    async with _as_sqlalchemy_errors_pg(conn, sql):
        pg = await _asyncpg(conn)
        return _rows_changed(await pg.execute(for_dialect(sql, "postgresql"), *params))


async def execute_many(conn: AsyncConnection, sql: str, rows: Sequence[tuple[Any, ...]]) -> int:
    """Run ``sql`` once per row; returns the rows changed (-1 if the driver cannot say)."""
    if not rows:
        return 0
    raw = _inline_sqlite(conn)
    if raw is not None:
        with _as_sqlalchemy_errors(sql):
            return raw.executemany(sql, rows).rowcount
    if conn.dialect.driver != "asyncpg":
        result = await conn.exec_driver_sql(for_dialect(sql, conn.dialect.name), list(rows))
        return result.rowcount
    async with _as_sqlalchemy_errors_pg(conn, sql):
        pg = await _asyncpg(conn)
        await pg.executemany(for_dialect(sql, "postgresql"), rows)
    return -1


async def fetch(conn: AsyncConnection, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    raw = _inline_sqlite(conn)
    if raw is not None:
        with _as_sqlalchemy_errors(sql):
            return raw.execute(sql, params).fetchall()
    if conn.dialect.driver != "asyncpg":
        result = await conn.exec_driver_sql(for_dialect(sql, conn.dialect.name), params)
        return list(result.all())
    async with _as_sqlalchemy_errors_pg(conn, sql):
        pg = await _asyncpg(conn)
        return await pg.fetch(for_dialect(sql, "postgresql"), *params)


@functools.lru_cache(maxsize=256)
def in_list(count: int) -> str:
    """``(?, ?, ...)`` for an ``IN`` of ``count`` values."""
    return "(" + ", ".join("?" * count) + ")"


@functools.lru_cache(maxsize=256)
def values_list(columns: int, rows: int) -> str:
    one = "(" + ", ".join("?" * columns) + ")"
    return ", ".join([one] * rows)


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]
