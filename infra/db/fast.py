"""Hot-path statements as driver SQL, for the few statements run for every message.

SQLAlchemy Core's per-row parameter processing costs more CPU than SQLite's own work at
thousands of rows a second, so the statements every message runs (inbox, outbox,
timeline, saga state, timers) are written once as SQL with ``?`` placeholders, turned into
``$n`` for asyncpg, and executed with plain tuples through ``exec_driver_sql``. The SQL
is the common subset of SQLite and PostgreSQL (``ON CONFLICT``, ``RETURNING``); the tables
are the ones the migrations create, unqualified (PostgreSQL resolves them through the
connection's ``search_path``).

On the inline SQLite driver the statements go straight to the ``sqlite3`` connection under
the transaction SQLAlchemy opened: exec_driver_sql's own work per statement (execution
context, cursor adapter, result wrapper) cost several times what SQLite spends. The rows
come back as plain tuples (read by position, as every caller does) and SQLite's errors
are raised as SQLAlchemy's, as through the engine.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any

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


async def execute(conn: AsyncConnection, sql: str, params: tuple[Any, ...] = ()) -> int:
    """Run ``sql`` once; returns the rows changed."""
    raw = _inline_sqlite(conn)
    if raw is None:
        return (await conn.exec_driver_sql(for_dialect(sql, conn.dialect.name), params)).rowcount
    with _as_sqlalchemy_errors(sql):
        return raw.execute(sql, params).rowcount


async def execute_many(conn: AsyncConnection, sql: str, rows: Sequence[tuple[Any, ...]]) -> int:
    """Run ``sql`` once per row; returns the rows changed (-1 if the driver cannot say)."""
    if not rows:
        return 0
    raw = _inline_sqlite(conn)
    if raw is None:
        result = await conn.exec_driver_sql(for_dialect(sql, conn.dialect.name), list(rows))
        return result.rowcount
    with _as_sqlalchemy_errors(sql):
        return raw.executemany(sql, rows).rowcount


async def fetch(conn: AsyncConnection, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    raw = _inline_sqlite(conn)
    if raw is None:
        result = await conn.exec_driver_sql(for_dialect(sql, conn.dialect.name), params)
        return list(result.all())
    with _as_sqlalchemy_errors(sql):
        return raw.execute(sql, params).fetchall()


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
