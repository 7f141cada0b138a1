"""The TSM's registry tables on SQLite and PostgreSQL (migrations from ``workers/tsm``)."""

from __future__ import annotations

import pytest

from infra.db.database import Database
from infra.db.migrate import upgrade
from workers.tsm.registry import (
    AppletState,
    ChallengeMode,
    MemoryRegistry,
    Registry,
    SeRecord,
    SqlRegistry,
    UnknownSecureElement,
)


def _record() -> SeRecord:
    return SeRecord(
        cin="0102030405060708090A",
        kdd="0102030405060708090A",
        device_id="phone-1",
        key_version=0x30,
        sequence_counter=7,
        challenge_mode=ChallengeMode.RANDOM,
    )


async def _exercise(registry: Registry) -> None:
    with pytest.raises(UnknownSecureElement):
        await registry.get("FFFF")
    record = _record()
    await registry.add(record)
    await registry.add(record)  # enrolling twice is harmless
    stored = await registry.get(record.cin)
    assert stored == record
    stored.sequence_counter = 9
    stored.applet_state = AppletState.PERSONALISED
    stored.holds_keys = True
    stored.owner_reference = "person-9"
    stored.pending_key_version = 0x31
    stored.sealed_temporary_pins = b"\x00" * 40
    stored.last_seen = 1234.5
    await registry.save(stored)
    assert await registry.get(record.cin) == stored

    assert await registry.operation("cmd-1") is None
    await registry.start_operation("cmd-1", record.cin, "install")
    await registry.start_operation("cmd-1", record.cin, "install")  # a redelivery
    running = await registry.operation("cmd-1")
    assert running is not None and running.status == "running" and running.reply is None
    await registry.finish_operation("cmd-1", b'{"ok":true}')
    done = await registry.operation("cmd-1")
    assert done is not None and done.status == "done" and done.reply == b'{"ok":true}'

    # The engine's two-transaction pair: begin (look up, mark running) and complete.
    before, element = await registry.begin("cmd-2", record.cin, "inspect")
    assert before is None and element == stored
    again, _ = await registry.begin("cmd-2", record.cin, "inspect")
    assert again is not None and again.status == "running"
    element.sequence_counter = 10
    await registry.complete(element, "cmd-2", None)  # a transient failure: not done
    assert (await registry.get(record.cin)).sequence_counter == 10
    assert (await registry.operation("cmd-2")).status == "running"
    await registry.complete(element, "cmd-2", b"{}")
    assert (await registry.operation("cmd-2")).reply == b"{}"
    unknown, nothing = await registry.begin("cmd-3", "ABCD", "inspect")
    assert unknown is None and nothing is None


async def test_memory_registry() -> None:
    await _exercise(MemoryRegistry())


async def test_sqlite_registry(tmp_path) -> None:
    db = Database.for_service("tsm", data_dir=tmp_path)
    try:
        await upgrade(db, "tsm")
        await _exercise(SqlRegistry(db))
    finally:
        await db.close()


@pytest.mark.postgres
async def test_postgres_registry(pg_url: str, unique: str) -> None:
    db = Database.for_service("tsm", url=pg_url, schema=f"tsm_{unique}")
    try:
        await db.ensure_schema()
        await upgrade(db, "tsm")
        await _exercise(SqlRegistry(db))
    finally:
        await db.drop_schema()
        await db.close()
