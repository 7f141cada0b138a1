"""One async SQLAlchemy engine per service: SQLite by default, PostgreSQL by URL.

SQLite (``sqlite+aiosqlite:///<data_dir>/<service>.db``) runs in WAL mode with one pooled
connection: SQLite has a single writer anyway, so the process queues its transactions on
that connection instead of fighting over the file lock, and every transaction starts with
``BEGIN IMMEDIATE`` so that it holds the write lock from its first statement (no upgrade
deadlock between a reader that later writes and another writer). The connection runs on
the event loop's thread (``inline_sqlite``), not on aiosqlite's worker thread.

PostgreSQL (``postgresql+asyncpg://...``) gets a pool and, when ``schema`` is given, that
schema as its ``search_path``: each service owns its tables in its own schema, so the
``outbox`` of the CA and the ``outbox`` of the TSM never meet.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from infra.db.inline_sqlite import InlineConnection
from protocol.errors import JpkiError

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# WAL lets readers (operators' tools) run beside the writer; NORMAL is durable across a
# process crash in WAL mode (only an OS crash can lose the last transactions). 16 KiB pages
# (a new file only: SQLite keeps an existing file's page size): a commit writes each page
# it changed as a WAL frame of two writes, and the rows a batch touches (saga rows,
# timeline, inbox, outbox) share fewer, larger pages. Embedded issuance bench, six
# alternated pairs: WAL writes per issuance 160 → 54, 121.2 → 127.6 issuances/s (medians).
_SQLITE_PRAGMAS = (
    "PRAGMA page_size=16384",
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA busy_timeout=10000",
    "PRAGMA foreign_keys=ON",
    "PRAGMA temp_store=MEMORY",
    "PRAGMA cache_size=-32000",
)


class DatabaseConfigError(JpkiError):
    """A database URL or schema name this project cannot use."""


def sqlite_url(data_dir: str | Path, service: str) -> str:
    """The default store of ``service``: ``<data_dir>/<service>.db``."""
    path = Path(data_dir)
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{(path / f'{service}.db').resolve()}"


class Database:
    """An engine plus the transaction helpers every service uses.

    ``async with db.transaction() as conn:`` commits on success and rolls back on any
    exception; ``conn`` is a SQLAlchemy Core ``AsyncConnection``.
    """

    def __init__(self, url: str, *, schema: str | None = None, pool_size: int = 10) -> None:
        parsed = make_url(url)
        self.url = url
        self.dialect = parsed.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise DatabaseConfigError(f"unsupported database backend {self.dialect!r}")
        if schema is not None and not _SCHEMA_NAME.match(schema):
            raise DatabaseConfigError(f"schema name {schema!r} is not a plain identifier")
        self.schema = schema if self.dialect == "postgresql" else None
        self._inline = self.dialect == "sqlite" and parsed.database not in (None, "", ":memory:")
        # Statement parameters carry message bodies (a TSM reply holds temporary PINs):
        # never in an exception's text or a log line.
        kwargs: dict[str, Any] = {"hide_parameters": True}
        if self.dialect == "sqlite":
            kwargs.update(pool_size=1, max_overflow=0, pool_timeout=120)
            if self._inline:
                path = parsed.database
                kwargs["async_creator"] = lambda: InlineConnection.open(path)
        else:
            # No pre-ping: it costs a round trip (BEGIN/SELECT 1/ROLLBACK) on every checkout.
            # After a database restart the first statement on a stale connection fails as a
            # disconnect, SQLAlchemy then recycles the whole pool, and the failed unit of work
            # is retried like any other (a delivery is redelivered, a relay polls again).
            kwargs.update(pool_size=pool_size, max_overflow=pool_size)
            if self.schema:
                kwargs["connect_args"] = {"server_settings": {"search_path": self.schema}}
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.dialect == "sqlite":
            _configure_sqlite(self.engine)
        # The inline SQLite store keeps its one connection checked out between transactions:
        # a pool checkout and return cost more CPU than a short transaction itself. The lock
        # queues the process's transactions on it, as the one-connection pool did.
        self._held: AsyncConnection | None = None
        self._held_lock = asyncio.Lock()

    @classmethod
    def for_service(
        cls,
        service: str,
        *,
        url: str | None = None,
        data_dir: str | Path = "data",
        schema: str | None = None,
    ) -> Database:
        """``url`` if given (PostgreSQL: tables in schema ``schema`` or ``service``), else
        the service's SQLite file in ``data_dir``."""
        if url is None:
            return cls(sqlite_url(data_dir, service))
        return cls(url, schema=schema or service)

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        if not self._inline:
            async with self.engine.begin() as conn:
                yield conn
            return
        # the inline SQLite driver never suspends: without this, a loop of transactions
        # would keep every other task of the process waiting until it ends
        await asyncio.sleep(0)
        async with self._held_lock:
            conn = self._held
            if conn is None or conn.closed or conn.invalidated:
                conn = self._held = await self.engine.connect()
            try:
                async with conn.begin():
                    yield conn
            except BaseException:
                if conn.closed or conn.invalidated:
                    self._held = None
                raise

    async def ensure_schema(self) -> None:
        """Create the PostgreSQL schema if it is missing (no-op on SQLite)."""
        if self.schema is None:
            return
        plain = create_async_engine(self.url, pool_size=1, max_overflow=0, hide_parameters=True)
        try:
            async with plain.begin() as conn:
                await conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
        finally:
            await plain.dispose()

    async def drop_schema(self) -> None:
        """Drop the PostgreSQL schema and everything in it (tests clean up with this)."""
        if self.schema is None:
            return
        plain = create_async_engine(self.url, pool_size=1, max_overflow=0, hide_parameters=True)
        try:
            async with plain.begin() as conn:
                await conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        finally:
            await plain.dispose()

    async def close(self) -> None:
        async with self._held_lock:
            held, self._held = self._held, None
            if held is not None:
                await held.close()
        await self.engine.dispose()

    def __repr__(self) -> str:
        # the URL may carry a password: show only what identifies the store
        parsed = make_url(self.url)
        return f"Database({self.dialect}, {parsed.database!r}, schema={self.schema!r})"


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Hand transaction control to SQLAlchemy's "begin" event below (the documented
        # recipe for pysqlite/aiosqlite), then apply the pragmas outside any transaction.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in _SQLITE_PRAGMAS:
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
