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
``unit()`` runs several calls in one transaction (on the bus, a batch of deliveries': a
command's records and its first script's state; an answer's look-up and what follows from
it). A SQL unit reads each row once and writes at its end, one executemany per statement
kind (``SqlUnit``); the bus worker has it read the batch's rows up front (``Prefetch``).
"""

from __future__ import annotations

import dataclasses
import enum
import operator
import time
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
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
from infra.db.fast import execute_many, fetch, in_list
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
# A unit writes an operation's last state, whichever calls (suspend, complete, finish) led
# there: one statement, so one executemany for all of a batch's operations. "done" is final:
# a unit that read the operation as running (a sweeper giving up on its script) must not
# write over the reply another replica stored meanwhile.
_UPDATE_OPERATION = (
    "UPDATE tsm_operations SET status = ?, reply = ?, script_id = ?, state = ?, updated_at = ?"
    " WHERE command_id = ? AND status = 'running'"
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


def _record_update(row: tuple) -> tuple[Any, ...]:
    """``_UPDATE_SE``'s parameters for a record's row (booleans as booleans: PostgreSQL's
    columns are boolean)."""
    record = SeRecord(*row)
    return (
        record.kdd, record.device_id, record.key_version, record.sequence_counter,
        record.challenge_mode.value, record.pending_key_version, record.applet_state.value,
        bool(record.holds_keys), record.owner_reference, record.last_seen,
        bool(record.pending_cleanup), record.sealed_temporary_pins, time.time(), record.cin,
    )


def _operation_update(operation: OperationRecord) -> tuple[Any, ...]:
    return (operation.status, operation.reply, operation.script_id, operation.state,
            operation.updated_at, operation.command_id)


def _any_of(conn: AsyncConnection, column: str, values: Sequence[str]) -> tuple[str, tuple]:
    """``column`` is one of ``values``: one array parameter on PostgreSQL (one statement
    text, prepared once, whatever the batch's size), an ``IN`` list on SQLite."""
    if conn.dialect.name == "postgresql":
        return f"{column} = ANY(?)", (list(values),)
    return f"{column} IN {in_list(len(values))}", tuple(values)


@dataclass(frozen=True, slots=True)
class Prefetch:
    """What a batch's deliveries will ask their unit for, read before they run."""

    commands: Mapping[str, str] = field(default_factory=dict)  # command id -> the SE's cin
    script_ids: Collection[str] = ()  # answers (or timeouts) of scripts sent before


class SqlUnit:
    """One transaction of the SQL registry, reading each row once and writing at the end.

    Reads are answered from what the unit has read or written already (its own writes
    included: two operations of one batch may touch the same SE or operation); a row it
    has not seen is read then. Writes are kept and flushed when the unit ends, before the
    commit, as one executemany per statement kind (asyncpg sends each in one round trip):
    inserts first, then each changed row's last state, rows in key order (two replicas'
    flushes then lock shared rows in the same order). A unit that fails, in its body or
    in its flush, rolls back whole: its transaction commits only after the flush.
    """

    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn
        # What the transaction sees, with the unit's writes applied. None: no such row.
        self._elements: dict[str, tuple | None] = {}  # cin -> row, in ``SeRecord`` order
        self._operations: dict[str, OperationRecord | None] = {}
        self._by_script: dict[str, str] = {}  # script id -> command id, of the known operations
        self._nothing_waits: set[str] = set()  # script ids read and found on no operation
        # What the flush writes.
        self._new_elements: dict[str, tuple] = {}  # first contact: inserted as added
        self._saved_elements: set[str] = set()
        self._new_operations: dict[str, tuple[Any, ...]] = {}  # _INSERT_OPERATION's parameters
        self._changed_operations: set[str] = set()

    @asynccontextmanager
    async def unit(self) -> AsyncIterator[SqlUnit]:
        yield self  # joins this transaction

    async def prefetch(self, needs: Prefetch) -> None:
        """Read in two statements what ``needs`` names: the commands' and the scripts'
        operations, then the SEs of all of them."""
        command_ids = [c for c in needs.commands if c not in self._operations]
        script_ids = [s for s in needs.script_ids
                      if s not in self._by_script and s not in self._nothing_waits]
        if command_ids or script_ids:
            where = [_any_of(self._conn, column, values)
                     for column, values in (("command_id", command_ids), ("script_id", script_ids))
                     if values]
            conditions = " OR ".join(condition for condition, _ in where)
            params = tuple(value for _, values in where for value in values)
            sql = f"SELECT {_OPERATION_COLUMNS} FROM tsm_operations WHERE {conditions}"  # noqa: S608
            for row in await fetch(self._conn, sql, params):
                self._learn_operation(_row_to_operation(row))
            for command_id in command_ids:
                self._operations.setdefault(command_id, None)
            self._nothing_waits.update(s for s in script_ids if s not in self._by_script)
        cins = {*needs.commands.values()}
        cins.update(op.cin for op in self._operations.values() if op is not None)
        unread = sorted(cins - self._elements.keys())
        if unread:
            condition, params = _any_of(self._conn, "cin", unread)
            sql = f"SELECT {_SE_COLUMNS} FROM secure_elements WHERE {condition}"  # noqa: S608
            for row in await fetch(self._conn, sql, params):
                self._elements.setdefault(row[0], _as_row(_row_to_record(row)))
            for cin in unread:
                self._elements.setdefault(cin, None)

    async def flush(self) -> None:
        conn = self._conn
        if self._new_elements:
            await execute_many(conn, _INSERT_SE, [
                _record_update(self._new_elements[cin]) for cin in sorted(self._new_elements)
            ])
        if self._new_operations:
            await execute_many(conn, _INSERT_OPERATION, [
                self._new_operations[c] for c in sorted(self._new_operations)
            ])
        if self._saved_elements:
            await execute_many(conn, _UPDATE_SE, [
                _record_update(self._elements[cin]) for cin in sorted(self._saved_elements)
            ])
        if self._changed_operations:
            await execute_many(conn, _UPDATE_OPERATION, [
                _operation_update(self._operations[c]) for c in sorted(self._changed_operations)
            ])
        self._new_elements.clear()
        self._new_operations.clear()
        self._saved_elements.clear()
        self._changed_operations.clear()

    # ------------------------------------------------------------------ reads

    async def _element(self, cin: str) -> tuple | None:
        if cin not in self._elements:
            rows = await fetch(self._conn, _SELECT_SE, (cin,))
            self._elements[cin] = _as_row(_row_to_record(rows[0])) if rows else None
        return self._elements[cin]

    async def _operation(self, command_id: str) -> OperationRecord | None:
        if command_id not in self._operations:
            rows = await fetch(self._conn, _SELECT_OPERATION, (command_id,))
            self._operations[command_id] = None
            if rows:
                self._learn_operation(_row_to_operation(rows[0]))
        return self._operations[command_id]

    def _learn_operation(self, operation: OperationRecord) -> None:
        """A row read from the database, unless the unit knows the operation already (its
        own state of it is newer)."""
        if self._operations.get(operation.command_id) is not None:
            return
        self._operations[operation.command_id] = operation
        if operation.script_id is not None:
            self._by_script[operation.script_id] = operation.command_id

    def _wait_for(self, operation: OperationRecord, script_id: str | None) -> None:
        if operation.script_id is not None:
            self._by_script.pop(operation.script_id, None)
        operation.script_id = script_id
        if script_id is not None:
            self._by_script[script_id] = operation.command_id

    # ------------------------------------------------------------------ the Registry

    async def add(self, record: SeRecord) -> None:
        if await self._element(record.cin) is None:  # else: enrolled already, left alone
            self._elements[record.cin] = self._new_elements[record.cin] = _as_row(record)

    async def get(self, cin: str) -> SeRecord:
        row = await self._element(cin)
        if row is None:
            raise UnknownSecureElement("secure element not in the registry")
        return SeRecord(*row)

    async def save(self, record: SeRecord) -> None:
        if await self._element(record.cin) is not None:  # an UPDATE of no row changes nothing
            self._elements[record.cin] = _as_row(record)
            self._saved_elements.add(record.cin)

    async def operation(self, command_id: str) -> OperationRecord | None:
        operation = await self._operation(command_id)
        return dataclasses.replace(operation) if operation is not None else None

    async def start_operation(self, command_id: str, cin: str, operation: str) -> None:
        if await self._operation(command_id) is None:
            now = time.time()
            self._operations[command_id] = OperationRecord(command_id, cin, operation,
                                                           "running", updated_at=now)
            self._new_operations[command_id] = (command_id, cin, operation, now, now)

    async def finish_operation(self, command_id: str, reply: bytes) -> None:
        await self._change(command_id, "done", reply, None)

    async def begin(
        self, command_id: str, cin: str, operation: str
    ) -> tuple[OperationRecord | None, SeRecord | None]:
        before = await self.operation(command_id)
        if before is None:
            await self.start_operation(command_id, cin, operation)
        row = await self._element(cin)
        return before, SeRecord(*row) if row is not None else None

    async def complete(
        self, record: SeRecord | None, command_id: str, reply: bytes | None,
        state: bytes | None = None,
    ) -> None:
        if record is not None:
            await self.save(record)
        if reply is not None:
            await self._change(command_id, "done", reply, state)
            return
        # Ended without a reply (a transient failure): it waits for nothing any more.
        await self._set_waiting(command_id, None, None)

    async def suspend(
        self, record: SeRecord, command_id: str, script_id: str, state: bytes
    ) -> None:
        await self.save(record)
        await self._set_waiting(command_id, script_id, state)

    async def _set_waiting(
        self, command_id: str, script_id: str | None, state: bytes | None
    ) -> None:
        operation = await self._operation(command_id)
        if operation is not None:
            self._wait_for(operation, script_id)
            operation.state, operation.updated_at = state, time.time()
            self._changed_operations.add(command_id)

    async def _change(
        self, command_id: str, status: str, reply: bytes, state: bytes | None
    ) -> None:
        operation = await self._operation(command_id)
        if operation is not None:
            operation.status, operation.reply, operation.state = status, reply, state
            operation.updated_at = time.time()
            self._changed_operations.add(command_id)

    async def waiting_for(self, script_id: str) -> OperationRecord | None:
        if script_id not in self._by_script and script_id not in self._nothing_waits:
            rows = await fetch(self._conn, _SELECT_WAITING, (script_id,))
            if rows:
                self._learn_operation(_row_to_operation(rows[0]))
            if script_id not in self._by_script:  # none, or the unit moved it on
                self._nothing_waits.add(script_id)
        command_id = self._by_script.get(script_id)
        return await self.operation(command_id) if command_id is not None else None

    async def overdue(self, before: float, limit: int = 100) -> list[str]:
        await self.flush()  # the query reads the table: the unit's writes first
        rows = await self._conn.execute(
            select(tsm_operations.c.script_id)
            .where(
                tsm_operations.c.status == "running",
                tsm_operations.c.script_id.is_not(None),
                tsm_operations.c.updated_at < before,
            )
            .limit(limit)
        )
        return [row.script_id for row in rows]


class SqlRegistry:
    """The registry in the TSM's own tables (migrations in ``workers/tsm/migrations``).

    Each call here is a unit (``SqlUnit``) of its own; calls that must share a transaction
    are made on one ``unit()``."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @asynccontextmanager
    async def unit(self, prefetch: Prefetch | None = None) -> AsyncIterator[SqlUnit]:
        """One transaction; ``prefetch`` names the rows to read up front, in two statements,
        instead of one by one as the calls ask for them."""
        async with self.db.transaction() as conn:
            unit = SqlUnit(conn)
            if prefetch is not None:
                await unit.prefetch(prefetch)
            yield unit
            await unit.flush()

    async def add(self, record: SeRecord) -> None:
        async with self.unit() as unit:
            await unit.add(record)

    async def get(self, cin: str) -> SeRecord:
        async with self.unit() as unit:
            return await unit.get(cin)

    async def save(self, record: SeRecord) -> None:
        async with self.unit() as unit:
            await unit.save(record)

    async def operation(self, command_id: str) -> OperationRecord | None:
        async with self.unit() as unit:
            return await unit.operation(command_id)

    async def start_operation(self, command_id: str, cin: str, operation: str) -> None:
        async with self.unit() as unit:
            await unit.start_operation(command_id, cin, operation)

    async def finish_operation(self, command_id: str, reply: bytes) -> None:
        async with self.unit() as unit:
            await unit.finish_operation(command_id, reply)

    async def begin(
        self, command_id: str, cin: str, operation: str
    ) -> tuple[OperationRecord | None, SeRecord | None]:
        async with self.unit() as unit:
            return await unit.begin(command_id, cin, operation)

    async def complete(
        self, record: SeRecord | None, command_id: str, reply: bytes | None,
        state: bytes | None = None,
    ) -> None:
        async with self.unit() as unit:
            await unit.complete(record, command_id, reply, state)

    async def suspend(
        self, record: SeRecord, command_id: str, script_id: str, state: bytes
    ) -> None:
        async with self.unit() as unit:
            await unit.suspend(record, command_id, script_id, state)

    async def waiting_for(self, script_id: str) -> OperationRecord | None:
        async with self.unit() as unit:
            return await unit.waiting_for(script_id)

    async def overdue(self, before: float, limit: int = 100) -> list[str]:
        async with self.unit() as unit:
            return await unit.overdue(before, limit)
