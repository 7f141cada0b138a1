"""The secure-element registry the SP-TSM owns, and its record of operations.

``secure_elements``: one row per SE the TSM manages — identity (CIN, KDD), device, the
SCP03 key version (and the one a rotation is putting), the last sequence counter the TSM
used, the card-challenge mode, what is on the SE (applet state, keys, whose), last seen,
pending clean-up, and the temporary PINs waiting for release (sealed: AES-GCM under a key
derived from the master keys, never in clear).

``tsm_operations``: one row per command id — the idempotency record. A command whose row
says ``done`` is answered with the stored reply; one that says ``running`` was cut off
and is run again (every script is safe to re-run).

Two implementations of one interface: ``SqlRegistry`` (the service, SQLite or PostgreSQL
through ``infra.db``) and ``MemoryRegistry`` (benchmarks and the in-process phone link).
``unit()`` runs several calls in one transaction (on the bus, each delivery's: a command's
records and its first script's state; an answer's look-up and what follows from it).
"""

from __future__ import annotations

import dataclasses
import enum
import operator
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from infra.db.database import Database
from infra.db.fast import execute, fetch
from protocol.errors import JpkiError


class UnknownSecureElement(JpkiError):
    """A command names an SE the TSM never provisioned."""


class AppletState(enum.StrEnum):
    ABSENT = "absent"
    INSTALLED = "installed"  # selectable, no keys
    KEYED = "keyed"  # key pair(s) generated
    PERSONALISED = "personalised"  # certificates stored, temporary PINs set
    RELEASED = "released"  # handed over for local PIN setting
    UNKNOWN = "unknown"  # an operation was cut off: the next inspect tells


class ChallengeMode(enum.StrEnum):
    PSEUDO_RANDOM = "pseudo-random"
    RANDOM = "random"


@dataclass(slots=True)
class SeRecord:
    cin: str  # upper-case hex
    kdd: str
    device_id: str | None
    key_version: int
    sequence_counter: int  # last counter value the TSM used (or saw) for this SE
    challenge_mode: ChallengeMode = ChallengeMode.PSEUDO_RANDOM
    pending_key_version: int | None = None  # a rotation's target, until confirmed
    applet_state: AppletState = AppletState.ABSENT
    holds_keys: bool = False
    owner_reference: str | None = None
    last_seen: float | None = None
    pending_cleanup: bool = False
    sealed_temporary_pins: bytes | None = field(default=None, repr=False)


@dataclass(slots=True)
class OperationRecord:
    command_id: str
    cin: str
    operation: str
    status: str  # running | done
    reply: bytes | None = None  # the encoded reply body, once done
    script_id: str | None = None  # the script the operation waits for (or last sent)
    state: bytes | None = field(default=None, repr=False)  # sealed: see TsmEngine.start
    updated_at: float = 0.0


class Registry(Protocol):
    def unit(self) -> AbstractAsyncContextManager[Registry]:
        """A view of the registry whose calls all run in one transaction, committed when
        the block ends without an exception (rolled back otherwise)."""
        ...

    async def add(self, record: SeRecord) -> None: ...

    async def get(self, cin: str) -> SeRecord: ...

    async def save(self, record: SeRecord) -> None: ...

    async def operation(self, command_id: str) -> OperationRecord | None: ...

    async def start_operation(self, command_id: str, cin: str, operation: str) -> None: ...

    async def finish_operation(self, command_id: str, reply: bytes) -> None: ...

    async def begin(
        self, command_id: str, cin: str, operation: str
    ) -> tuple[OperationRecord | None, SeRecord | None]:
        """One transaction: the operation as it was (marked running if new), and the SE."""
        ...

    async def complete(
        self, record: SeRecord | None, command_id: str, reply: bytes | None,
        state: bytes | None = None,
    ) -> None:
        """One transaction: save the SE's record and, with a reply, mark the operation done
        (``state`` replaces the stored operation state)."""
        ...

    async def suspend(
        self, record: SeRecord, command_id: str, script_id: str, state: bytes
    ) -> None:
        """One transaction: save the SE's record and the operation's state, waiting for
        ``script_id``."""
        ...

    async def waiting_for(self, script_id: str) -> OperationRecord | None:
        """The operation that sent ``script_id`` last (running or done), if any."""
        ...

    async def overdue(self, before: float, limit: int = 100) -> list[str]:
        """Script ids of running operations waiting since before ``before``."""
        ...


_FIELDS = tuple(f.name for f in dataclasses.fields(SeRecord))
_as_row = operator.attrgetter(*_FIELDS)  # a record as a tuple, in field order, at C speed


class MemoryRegistry:
    """The registry in a dict (benchmarks, tests, the embedded single-process mode)."""

    def __init__(self) -> None:
        # Rows, not records: callers get their own copy, as from a database.
        self._elements: dict[str, tuple] = {}
        self._operations: dict[str, OperationRecord] = {}
        self._by_script: dict[str, str] = {}  # script id -> command id

    @asynccontextmanager
    async def unit(self) -> AsyncIterator[MemoryRegistry]:
        # Nothing to commit: each call takes effect at once, and a failed unit's effects
        # (an operation marked running) are the ones a crash between calls would leave.
        yield self

    async def add(self, record: SeRecord) -> None:
        self._elements.setdefault(record.cin, _as_row(record))

    async def get(self, cin: str) -> SeRecord:
        try:
            return SeRecord(*self._elements[cin])
        except KeyError:
            raise UnknownSecureElement("secure element not in the registry") from None

    async def save(self, record: SeRecord) -> None:
        self._elements[record.cin] = _as_row(record)

    async def operation(self, command_id: str) -> OperationRecord | None:
        record = self._operations.get(command_id)
        return dataclasses.replace(record) if record else None

    async def start_operation(self, command_id: str, cin: str, operation: str) -> None:
        self._operations.setdefault(
            command_id, OperationRecord(command_id, cin, operation, "running")
        )

    async def finish_operation(self, command_id: str, reply: bytes) -> None:
        record = self._operations[command_id]
        record.status, record.reply = "done", reply

    async def begin(
        self, command_id: str, cin: str, operation: str
    ) -> tuple[OperationRecord | None, SeRecord | None]:
        before = await self.operation(command_id)
        await self.start_operation(command_id, cin, operation)
        row = self._elements.get(cin)
        return before, SeRecord(*row) if row is not None else None

    async def complete(
        self, record: SeRecord | None, command_id: str, reply: bytes | None,
        state: bytes | None = None,
    ) -> None:
        if record is not None:
            self._elements[record.cin] = _as_row(record)
        operation = self._operations.get(command_id)
        if operation is None:
            return
        if reply is not None:
            operation.status, operation.reply = "done", reply
        elif operation.script_id is not None:
            # Ended without a reply (a transient failure): it waits for nothing any more.
            self._by_script.pop(operation.script_id, None)
            operation.script_id = None
        operation.state = state

    async def suspend(
        self, record: SeRecord, command_id: str, script_id: str, state: bytes
    ) -> None:
        self._elements[record.cin] = _as_row(record)
        operation = self._operations[command_id]
        previous = operation.script_id
        if previous is not None:
            self._by_script.pop(previous, None)
        operation.script_id, operation.state = script_id, state
        operation.updated_at = time.time()
        self._by_script[script_id] = command_id

    async def waiting_for(self, script_id: str) -> OperationRecord | None:
        command_id = self._by_script.get(script_id)
        return await self.operation(command_id) if command_id is not None else None

    async def overdue(self, before: float, limit: int = 100) -> list[str]:
        return [
            op.script_id for op in self._operations.values()
            if op.status == "running" and op.script_id is not None and op.updated_at < before
        ][:limit]


metadata = MetaData()

secure_elements = Table(
    "secure_elements",
    metadata,
    Column("cin", String(64), primary_key=True),
    Column("kdd", String(64), nullable=False),
    Column("device_id", String(64), nullable=True),
    Column("key_version", Integer, nullable=False),
    Column("pending_key_version", Integer, nullable=True),
    Column("sequence_counter", Integer, nullable=False),
    Column("challenge_mode", String(20), nullable=False),
    Column("applet_state", String(20), nullable=False),
    Column("holds_keys", Boolean, nullable=False),
    Column("owner_reference", String(64), nullable=True),
    Column("last_seen", Float, nullable=True),
    Column("pending_cleanup", Boolean, nullable=False),
    Column("sealed_temporary_pins", LargeBinary, nullable=True),
    Column("updated_at", Float, nullable=False),
)

tsm_operations = Table(
    "tsm_operations",
    metadata,
    Column("command_id", String(128), primary_key=True),
    Column("cin", String(64), nullable=False),
    Column("operation", String(32), nullable=False),
    Column("status", String(10), nullable=False),
    Column("reply", LargeBinary, nullable=True),
    Column("script_id", String(64), nullable=True),
    Column("state", LargeBinary, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

# The statements every operation runs, as driver SQL (``infra.db.fast``): building them
# with SQLAlchemy Core cost more CPU than SQLite's own work. Columns in ``SeRecord`` order.
_SE_COLUMNS = ", ".join(_FIELDS)
_SE_UPDATED = ", ".join(f"{name} = ?" for name in _FIELDS if name != "cin")
# (Only column names are formatted in, never a value: every value is a ``?`` parameter.)
_SELECT_SE = f"SELECT {_SE_COLUMNS} FROM secure_elements WHERE cin = ?"  # noqa: S608
_UPDATE_SE = f"UPDATE secure_elements SET {_SE_UPDATED}, updated_at = ? WHERE cin = ?"  # noqa: S608
# First contact, with ``_record_update``'s parameters (the cin last)
_SE_INSERTED = ", ".join([*(name for name in _FIELDS if name != "cin"), "updated_at", "cin"])
_INSERT_SE = (
    f"INSERT INTO secure_elements ({_SE_INSERTED}) VALUES ({', '.join('?' * len(_FIELDS))}, ?)"  # noqa: S608
    " ON CONFLICT (cin) DO NOTHING"
)
_OPERATION_COLUMNS = "command_id, cin, operation, status, reply, script_id, state, updated_at"
_SELECT_OPERATION = (
    f"SELECT {_OPERATION_COLUMNS} FROM tsm_operations WHERE command_id = ?"  # noqa: S608
)
_SELECT_WAITING = f"SELECT {_OPERATION_COLUMNS} FROM tsm_operations WHERE script_id = ?"  # noqa: S608
_INSERT_OPERATION = (
    "INSERT INTO tsm_operations (command_id, cin, operation, status, created_at, updated_at)"
    " VALUES (?, ?, ?, 'running', ?, ?) ON CONFLICT (command_id) DO NOTHING"
)
_SUSPEND_OPERATION = (
    "UPDATE tsm_operations SET script_id = ?, state = ?, updated_at = ? WHERE command_id = ?"
)
_FINISH_OPERATION = (
    "UPDATE tsm_operations SET status = 'done', reply = ?, state = ?, updated_at = ?"
    " WHERE command_id = ?"
)
# Ended without a reply (a transient failure): it waits for nothing any more.
_ABANDON_OPERATION = (
    "UPDATE tsm_operations SET script_id = NULL, state = NULL, updated_at = ? WHERE command_id = ?"
)


def _row_to_operation(row: Sequence[Any]) -> OperationRecord:
    return OperationRecord(*row)


def _row_to_record(row: Sequence[Any]) -> SeRecord:
    (cin, kdd, device_id, key_version, sequence_counter, challenge_mode, pending_key_version,
     applet_state, holds_keys, owner_reference, last_seen, pending_cleanup, sealed) = row
    return SeRecord(
        cin, kdd, device_id, key_version, sequence_counter, ChallengeMode(challenge_mode),
        pending_key_version, AppletState(applet_state), bool(holds_keys), owner_reference,
        last_seen, bool(pending_cleanup), sealed,
    )


def _record_update(record: SeRecord) -> tuple[Any, ...]:
    """``_UPDATE_SE``'s parameters (booleans as booleans: PostgreSQL's columns are boolean)."""
    return (
        record.kdd, record.device_id, record.key_version, record.sequence_counter,
        record.challenge_mode.value, record.pending_key_version, record.applet_state.value,
        bool(record.holds_keys), record.owner_reference, record.last_seen,
        bool(record.pending_cleanup), record.sealed_temporary_pins, time.time(), record.cin,
    )


async def _execute(conn: AsyncConnection, sql: str, params: tuple[Any, ...]) -> None:
    await execute(conn, sql, params)


async def _one(conn: AsyncConnection, sql: str, params: tuple[Any, ...]) -> Any | None:
    rows = await fetch(conn, sql, params)
    return rows[0] if rows else None


class SqlRegistry:
    """The registry in the TSM's own tables (migrations in ``workers/tsm/migrations``)."""

    def __init__(self, db: Database, connection: AsyncConnection | None = None) -> None:
        self.db = db
        self._connection = connection  # set inside ``unit()``: every call joins its transaction

    @asynccontextmanager
    async def unit(self) -> AsyncIterator[SqlRegistry]:
        if self._connection is not None:
            yield self
            return
        async with self.db.transaction() as conn:
            yield SqlRegistry(self.db, conn)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        if self._connection is not None:
            yield self._connection
            return
        async with self.db.transaction() as conn:
            yield conn

    async def add(self, record: SeRecord) -> None:
        async with self._transaction() as conn:
            await _execute(conn, _INSERT_SE, _record_update(record))

    async def get(self, cin: str) -> SeRecord:
        async with self._transaction() as conn:
            row = await _one(conn, _SELECT_SE, (cin,))
        if row is None:
            raise UnknownSecureElement("secure element not in the registry")
        return _row_to_record(row)

    async def save(self, record: SeRecord) -> None:
        async with self._transaction() as conn:
            await _execute(conn, _UPDATE_SE, _record_update(record))

    async def operation(self, command_id: str) -> OperationRecord | None:
        async with self._transaction() as conn:
            row = await _one(conn, _SELECT_OPERATION, (command_id,))
        return _row_to_operation(row) if row is not None else None

    async def start_operation(self, command_id: str, cin: str, operation: str) -> None:
        now = time.time()
        async with self._transaction() as conn:
            await _execute(conn, _INSERT_OPERATION, (command_id, cin, operation, now, now))

    async def finish_operation(self, command_id: str, reply: bytes) -> None:
        async with self._transaction() as conn:
            await _execute(conn, _FINISH_OPERATION, (reply, None, time.time(), command_id))

    async def begin(
        self, command_id: str, cin: str, operation: str
    ) -> tuple[OperationRecord | None, SeRecord | None]:
        now = time.time()
        async with self._transaction() as conn:
            row = await _one(conn, _SELECT_OPERATION, (command_id,))
            before = _row_to_operation(row) if row is not None else None
            if before is None:
                await _execute(conn, _INSERT_OPERATION, (command_id, cin, operation, now, now))
            element = await _one(conn, _SELECT_SE, (cin,))
        return before, _row_to_record(element) if element is not None else None

    async def complete(
        self, record: SeRecord | None, command_id: str, reply: bytes | None,
        state: bytes | None = None,
    ) -> None:
        async with self._transaction() as conn:
            if record is not None:
                await _execute(conn, _UPDATE_SE, _record_update(record))
            if reply is not None:
                await _execute(conn, _FINISH_OPERATION, (reply, state, time.time(), command_id))
            else:
                await _execute(conn, _ABANDON_OPERATION, (time.time(), command_id))

    async def suspend(
        self, record: SeRecord, command_id: str, script_id: str, state: bytes
    ) -> None:
        async with self._transaction() as conn:
            await _execute(conn, _UPDATE_SE, _record_update(record))
            await _execute(conn, _SUSPEND_OPERATION, (script_id, state, time.time(), command_id))

    async def waiting_for(self, script_id: str) -> OperationRecord | None:
        async with self._transaction() as conn:
            row = await _one(conn, _SELECT_WAITING, (script_id,))
        return _row_to_operation(row) if row is not None else None

    async def overdue(self, before: float, limit: int = 100) -> list[str]:
        async with self._transaction() as conn:
            rows = await conn.execute(
                select(tsm_operations.c.script_id)
                .where(
                    tsm_operations.c.status == "running",
                    tsm_operations.c.script_id.is_not(None),
                    tsm_operations.c.updated_at < before,
                )
                .limit(limit)
            )
            return [row.script_id for row in rows]
