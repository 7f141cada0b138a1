"""Storage under the saga engine: migrations, outbox relays (SKIP LOCKED on PostgreSQL),
inbox de-duplication and parking of undecodable messages."""

from __future__ import annotations

import asyncio
import collections
import time

import msgspec
import pytest
from sqlalchemy import event, select

from infra.db import Database, InboxConsumer, OutboxRelay, add_to_outbox, handle_idempotently
from infra.db.messaging import outbox
from infra.db.migrate import upgrade
from infra.db.outbox import outgoing
from infra.transport.base import Outgoing
from infra.transport.inprocess import InProcessTransport
from protocol.envelope import build, message_type


@message_type("test.storage.note")
class Note(msgspec.Struct, frozen=True):
    text: str


class RecordingTransport(InProcessTransport):
    """In-process, with every published id recorded and a slow broker."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.published: list[str] = []
        self.delay = delay

    async def publish(self, messages):
        await asyncio.sleep(self.delay)
        await super().publish(messages)
        self.published.extend(m.message_id for m in messages)


@pytest.fixture
async def pg_db(pg_url, unique):
    db = Database(pg_url, schema=f"store_{unique}")
    await upgrade(db, "orchestrator")
    yield db
    await db.drop_schema()
    await db.close()


@pytest.fixture
async def sqlite_db(tmp_path):
    db = Database.for_service("orchestrator", data_dir=tmp_path)
    await upgrade(db, "orchestrator")
    yield db
    await db.close()


async def _pending(db: Database) -> int:
    """Rows still in the outbox: the relay deletes what it published."""
    async with db.transaction() as conn:
        return len((await conn.execute(select(outbox.c.message_id))).all())


def _rows(n: int, key: str = "test.storage.note") -> list[Outgoing]:
    return [Outgoing(routing_key=key, body=b"{}", message_id=f"m{i:05d}") for i in range(n)]


async def test_migrations_are_idempotent_and_versioned_per_service(sqlite_db):
    await upgrade(sqlite_db, "orchestrator")  # a second run changes nothing
    async with sqlite_db.transaction() as conn:
        version = await conn.exec_driver_sql("SELECT version_num FROM alembic_version_orchestrator")
        assert version.scalars().all() == ["0002"]
        tables = await conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='table'")
        assert {"outbox", "inbox", "sagas", "saga_timeline", "saga_timers"} <= set(tables.scalars())
        mode = await conn.exec_driver_sql("PRAGMA journal_mode")
        assert mode.scalar() == "wal"


@pytest.mark.postgres
async def test_two_relays_share_the_outbox_with_skip_locked(pg_db):
    async with pg_db.transaction() as conn:
        await add_to_outbox(conn, _rows(1500))
    claims: list[str] = []

    @event.listens_for(pg_db.engine.sync_engine, "before_cursor_execute")
    def record(conn, cursor, statement, params, context, executemany):
        if "FROM outbox" in statement and "outbox.routing_key" in statement:
            claims.append(statement)

    transport = RecordingTransport(delay=0.005)
    await transport.connect()
    await transport.declare_queue("notes", ["test.storage.#"])
    relays = [OutboxRelay(pg_db, transport, batch_size=50, fast_path=False, name=f"r{i}")
              for i in range(2)]

    async def drain(relay: OutboxRelay) -> None:
        while await relay.relay_once() > 0:
            pass

    await asyncio.gather(*(drain(r) for r in relays))
    counts = collections.Counter(transport.published)
    assert len(counts) == 1500 and max(counts.values()) == 1  # none twice, none lost
    assert all(r.published > 0 for r in relays), [r.published for r in relays]
    assert await _pending(pg_db) == 0  # no stuck rows
    assert claims and all("FOR UPDATE SKIP LOCKED" in c for c in claims)
    assert all("ORDER BY outbox.id" in c and "outbox.id >" not in c for c in claims)


async def test_relay_publishes_rows_a_dead_process_left_and_skips_unroutable(sqlite_db):
    async with sqlite_db.transaction() as conn:  # committed, never handed to a relay
        await add_to_outbox(conn, [*_rows(20), Outgoing("nobody.listens", b"{}", "lost-1")])
    transport = RecordingTransport()
    await transport.connect()
    await transport.declare_queue("notes", ["test.storage.#"])
    relay = OutboxRelay(sqlite_db, transport, retry_delay=60)
    await relay.start()
    try:
        for _ in range(100):
            if await _pending(sqlite_db) <= 1:
                break
            await asyncio.sleep(0.05)
    finally:
        await relay.stop()
    assert sorted(transport.published) == [f"m{i:05d}" for i in range(20)]
    async with sqlite_db.transaction() as conn:
        row = (await conn.execute(select(outbox).where(outbox.c.message_id == "lost-1"))).one()
    assert row.retry_at > time.time() + 30  # kept, retried later


class _DeleteFailsOnce:
    """The relay's database, whose next transaction fails once ``fail_next`` is set."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self.fail_next = False

    def __getattr__(self, name: str):  # noqa: ANN204 - everything else is the database's
        return getattr(self._db, name)

    def transaction(self):  # noqa: ANN201
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("database briefly unreachable")
        return self._db.transaction()


async def test_published_rows_are_deleted_after_a_failed_delete(sqlite_db):
    transport = RecordingTransport()
    await transport.connect()
    await transport.declare_queue("notes", ["test.storage.#"])
    flaky = _DeleteFailsOnce(sqlite_db)
    # no polls after the first: only the fast path's delete touches the database
    relay = OutboxRelay(flaky, transport, poll_interval=60, delete_interval=0.01,
                        retry_delay=0.01)  # type: ignore[arg-type]
    await relay.start()
    try:
        await asyncio.sleep(0.1)  # the first poll is over
        rows = _rows(5)
        async with sqlite_db.transaction() as conn:
            await add_to_outbox(conn, rows)
        flaky.fail_next = True  # the delete after the publish
        relay.handoff(rows)
        for _ in range(100):
            if await _pending(sqlite_db) == 0:
                break
            await asyncio.sleep(0.02)
        assert await _pending(sqlite_db) == 0  # deleted by the retry, no restart needed
    finally:
        await relay.stop()
    assert flaky.fail_next is False  # the failure did happen
    assert sorted(transport.published) == [f"m{i:05d}" for i in range(5)]  # each once


async def test_inbox_consumer_parks_garbage_and_applies_duplicates_once(sqlite_db):
    transport = InProcessTransport()
    await transport.connect()
    await transport.declare_queue("notes", ["test.storage.#"])
    seen: list[str] = []

    async def handle(conn, messages):
        seen.extend(m.body.text for m in messages)
        return []

    consumer = InboxConsumer(sqlite_db, transport, "notes", handle)
    await consumer.start()
    note = outgoing(build(Note("hello")))
    await transport.publish([note, note, Outgoing("test.storage.note", b"{not json", "bad-1")])
    for _ in range(100):
        parked = await transport.parked("notes")
        if parked and consumer.handled + consumer.duplicates >= 2:
            break
        await asyncio.sleep(0.02)
    await consumer.stop()
    assert seen == ["hello"]
    assert consumer.duplicates == 1
    assert [(p.message_id, p.reason.startswith("not a valid envelope")) for p in parked] == [
        ("bad-1", True)
    ]


async def test_handle_idempotently_runs_an_effect_once(sqlite_db):
    message = build(Note("once"))
    runs = []

    async def effect(conn, msg):
        runs.append(msg.envelope.message_id)
        return [outgoing(build(Note("reply"), causation_id=msg.envelope.message_id))]

    assert await handle_idempotently(sqlite_db, message, effect)
    assert not await handle_idempotently(sqlite_db, message, effect)
    assert runs == [message.envelope.message_id]
    assert await _pending(sqlite_db) == 1  # the reply waits in the outbox


async def test_database_errors_never_quote_message_bodies(sqlite_db):
    secret = Outgoing("tsm.reply.pins", b'{"temporary_pin":"739164"}', "same-id")
    with pytest.raises(Exception) as caught:
        async with sqlite_db.transaction() as conn:
            await add_to_outbox(conn, [secret, secret])  # a unique-key violation
    assert "UNIQUE" in str(caught.value)
    assert "739164" not in str(caught.value) and "739164" not in repr(caught.value)
