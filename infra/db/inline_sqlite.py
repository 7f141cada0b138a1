"""SQLite run on the event loop's own thread, behind the driver interface of aiosqlite.

aiosqlite hands every call (execute, fetch, commit) to a worker thread and back: two
thread switches per call, which on a 2-core machine cost 0.2–0.3 ms each, against
0.02 ms for a whole SQLite transaction in WAL mode with ``synchronous=NORMAL`` (no fsync
on commit). A service transaction makes four to ten such calls, so the hand-offs, not
SQLite, were most of a transaction's cost.

Each service's SQLite file is written by one process, and every call here is a short
statement on a local file, so running it inline blocks the loop for microseconds, not
for I/O waits. The one wait that could be long is another process holding the write lock
(an operator's tool): ``busy_timeout`` bounds it.

SQLAlchemy's aiosqlite dialect accepts any driver connection through ``async_creator``;
it uses only the methods below. Errors are sqlite3's own, which aiosqlite re-exports, so
the dialect maps them unchanged.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any


class InlineCursor:
    __slots__ = ("_cursor",)

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    async def __aenter__(self) -> InlineCursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._cursor.close()

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> InlineCursor:
        if parameters is None:
            self._cursor.execute(sql)
        else:
            self._cursor.execute(sql, parameters)
        return self

    async def executemany(self, sql: str, parameters: Iterable[Sequence[Any]]) -> InlineCursor:
        self._cursor.executemany(sql, parameters)
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(size if size is not None else self._cursor.arraysize)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value


class _RunNow:
    """Stands in for aiosqlite's queue to its thread: the dialect's isolation-level
    setter puts ``(future, function)`` there; here the function runs at once."""

    __slots__ = ()

    @staticmethod
    def put_nowait(item: tuple[asyncio.Future[Any], Callable[[], Any]]) -> None:
        future, function = item
        try:
            future.set_result(function())
        except Exception as exc:  # handed to the awaiting caller, as aiosqlite does
            future.set_exception(exc)


class InlineConnection:
    """The subset of ``aiosqlite.Connection`` that SQLAlchemy's dialect calls."""

    _tx = _RunNow()

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._conn = connection
        self._connection: sqlite3.Connection | None = connection

    @classmethod
    async def open(cls, path: str) -> InlineConnection:
        # check_same_thread off: the pool may finalise a connection from another thread
        return cls(sqlite3.connect(path, isolation_level=None, check_same_thread=False))

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    def cursor(self) -> InlineCursor:
        # aiosqlite returns an async context manager here; the dialect enters it
        return InlineCursor(self._conn.cursor())

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> InlineCursor:
        return await self.cursor().execute(sql, parameters)

    async def commit(self) -> None:
        self._conn.commit()

    async def rollback(self) -> None:
        self._conn.rollback()

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)

    async def close(self) -> None:
        if self._connection is not None:
            self._connection = None
            self._conn.close()

    def stop(self) -> None:
        """Forced close (the pool's terminate): nothing runs elsewhere to wait for."""
        if self._connection is not None:
            self._connection = None
            self._conn.close()
