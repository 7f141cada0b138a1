"""Hot-path statements as driver SQL, for the few statements run for every message.

SQLAlchemy Core's per-row parameter processing costs more CPU than SQLite's own work at
thousands of rows a second, so the statements every message runs (inbox, outbox,
timeline, saga state, timers) are written once as SQL with ``?`` placeholders, turned into
``$n`` for asyncpg, and executed with plain tuples through ``exec_driver_sql``. The SQL
is the common subset of SQLite and PostgreSQL (``ON CONFLICT``, ``RETURNING``); the tables
are the ones the migrations create, unqualified (PostgreSQL resolves them through the
connection's ``search_path``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

_PLACEHOLDER = re.compile(r"\?")


@functools.lru_cache(maxsize=512)
def for_dialect(sql: str, dialect: str) -> str:
    """``?`` placeholders for SQLite, ``$1, $2, ...`` for PostgreSQL (asyncpg)."""
    if dialect != "postgresql":
        return sql
    counter = iter(range(1, 1_000_000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


async def execute_many(conn: AsyncConnection, sql: str, rows: Sequence[tuple[Any, ...]]) -> int:
    """Run ``sql`` once per row; returns the rows changed (-1 if the driver cannot say)."""
    if not rows:
        return 0
    result = await conn.exec_driver_sql(for_dialect(sql, conn.dialect.name), list(rows))
    return result.rowcount


async def fetch(conn: AsyncConnection, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    result = await conn.exec_driver_sql(for_dialect(sql, conn.dialect.name), params)
    return list(result.all())


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
