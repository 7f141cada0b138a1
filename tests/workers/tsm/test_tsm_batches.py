"""The TSM worker's batches against the database, on SQLite and PostgreSQL: a batch reads
what it needs up front and writes at its end, sees its own writes, costs the same number
of statements whatever its size, and rolls back whole when anything in it fails."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import event

from device_sim.se.element import ScriptCommand, SecureElement
from device_sim.se.jpki_applet import JpkiAppletFactory, PooledKeys
from infra.db.database import Database
from infra.db.migrate import upgrade
from infra.transport.base import Outgoing
from orchestrator.messages import SeIdentity
from protocol.envelope import build, decode
from workers.tsm import messages as m
from workers.tsm import registry as registry_module
from workers.tsm.keys import MasterKeyRing, MasterKeys
from workers.tsm.provisioning import manufacture_secure_element
from workers.tsm.registry import (
    MemoryRegistry,
    Prefetch,
    Registry,
    SeRecord,
    SqlRegistry,
    UnknownSecureElement,
)
from workers.tsm.service import TsmWorker, _Work


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def tsm_db(request, tmp_path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        db = Database.for_service("tsm", data_dir=tmp_path)
    else:
        url, unique = request.getfixturevalue("pg_url"), request.getfixturevalue("unique")
        db = Database.for_service("tsm", url=url, schema=f"tsm_{unique}")
        await db.ensure_schema()
    try:
        await upgrade(db, "tsm")
        yield db
    finally:
        if db.is_postgres:
            await db.drop_schema()
        await db.close()


class RecordingTransport:
    """Keeps what the worker publishes; no broker (the test plays the phones)."""

    def __init__(self) -> None:
        self.published: list[Outgoing] = []

    async def publish(self, messages: list[Outgoing]) -> None:
        self.published.extend(messages)

    async def ack_many(self, deliveries: list[object]) -> None:
        pass


class Fleet:
    """SEs, and a TSM worker that the test hands its batches to directly."""

    def __init__(self, db: Database, count: int) -> None:
        ring = MasterKeyRing({0x30: MasterKeys.generate(0x30)}, 0x30)
        factory = JpkiAppletFactory(key_source=PooledKeys(2))
        self.elements: dict[str, SecureElement] = {
            f"phone-{n}": manufacture_secure_element(ring, n.to_bytes(10, "big"), factory)
            for n in range(count)
        }
        self.transport = RecordingTransport()
        self.worker = TsmWorker(db, self.transport, ring)  # type: ignore[arg-type]

    def identity(self, device_id: str) -> SeIdentity:
        cin = self.elements[device_id].identity.cin.hex().upper()
        return SeIdentity(cin=cin, kdd=cin)

    def inspect(self, device_id: str, command_id: str) -> _Work:
        command = m.InspectSe(command_id=command_id, device_id=device_id,
                              se=self.identity(device_id))
        return _Work(message=build(command, saga_id=f"saga-{command_id}", device_id=device_id))

    def scripts(self) -> list[tuple[str, m.SeScript]]:
        """The scripts published since the last call, with the phone each went to."""
        sent = [(o.routing_key.removeprefix("device."), decode(o.body).body)
                for o in self.transport.published if o.routing_key.startswith("device.")]
        self.transport.published.clear()
        return sent

    def replies(self) -> dict[str, m.TsmReply]:
        replies = {}
        for o in self.transport.published:
            body = decode(o.body).body
            assert isinstance(body, m.TsmReply), body
            replies[body.command_id] = body
        self.transport.published.clear()
        return replies

    def answer(self, scripts: list[tuple[str, m.SeScript]]) -> list[_Work]:
        """The phones run the scripts, in order, and answer each."""
        answers = []
        for device_id, script in scripts:
            outcome = self.elements[device_id].run_script(
                ScriptCommand(step.apdu, tuple(step.expect)) for step in script.steps
            )
            result = m.SeScriptResult(script_id=script.script_id,
                                      responses=list(outcome.responses),
                                      completed=outcome.completed)
            answers.append(_Work(message=build(result, device_id=device_id)))
        return answers

    def counter(self, device_id: str) -> int:
        element = self.elements[device_id]
        return element.manager.domains[element.sp_sd_aid].sequence_counter


def _counting_statements(monkeypatch, db: Database) -> Counter[str]:
    """Counts the registry's statements by kind (``fetch`` a read, ``execute_many`` one
    batched write) and, on PostgreSQL, the driver's executions (an executemany is one)."""
    counts: Counter[str] = Counter()
    fetch, execute_many = registry_module.fetch, registry_module.execute_many

    async def counting_fetch(conn, sql, params=()):  # noqa: ANN001, ANN202
        counts["reads"] += 1
        return await fetch(conn, sql, params)

    async def counting_execute_many(conn, sql, rows):  # noqa: ANN001, ANN202
        counts["writes"] += 1
        return await execute_many(conn, sql, rows)

    monkeypatch.setattr(registry_module, "fetch", counting_fetch)
    monkeypatch.setattr(registry_module, "execute_many", counting_execute_many)
    if db.is_postgres:  # counted by asyncpg, which the statements reach directly
        def on_query(record: object) -> None:
            if record.query.rstrip(";") not in ("BEGIN", "COMMIT", "ROLLBACK"):
                counts["driver executions"] += 1

        def on_checkout(dbapi_connection: object, *_args: object) -> None:
            driver = dbapi_connection.driver_connection
            driver.remove_query_logger(on_query)
            driver.add_query_logger(on_query)

        event.listen(db.engine.sync_engine, "checkout", on_checkout)
    return counts


async def test_a_batch_costs_the_same_statements_whatever_its_size(
    tsm_db: Database, monkeypatch
) -> None:
    fleet = Fleet(tsm_db, 10)
    counts = _counting_statements(monkeypatch, tsm_db)
    per_size: dict[int, tuple[Counter[str], Counter[str]]] = {}
    devices = iter(fleet.elements)
    for size in (2, 8):
        phones = [next(devices) for _ in range(size)]
        counts.clear()
        await fleet.worker._run_batch([fleet.inspect(d, f"inspect-{d}") for d in phones])
        commands = Counter(counts)
        scripts = fleet.scripts()
        assert sorted(d for d, _ in scripts) == sorted(phones)
        counts.clear()
        await fleet.worker._run_batch(fleet.answer(scripts))
        per_size[size] = (commands, Counter(counts))
        replies = fleet.replies()
        assert sorted(replies) == sorted(f"inspect-{d}" for d in phones)
        assert all(r.ok and r.round_trips == 1 for r in replies.values())
    assert per_size[2] == per_size[8]
    commands, answers = per_size[8]
    # First contact: read the operations and the SEs; insert SEs and operations, update
    # both. An answer: the same two reads; update the SEs and the operations.
    assert (commands["reads"], commands["writes"]) == (2, 4)
    assert (answers["reads"], answers["writes"]) == (2, 2)
    if tsm_db.is_postgres:
        assert commands["driver executions"] == 6
        assert answers["driver executions"] == 4


async def test_two_operations_on_one_se_in_one_batch_see_each_others_writes(
    tsm_db: Database,
) -> None:
    fleet = Fleet(tsm_db, 1)
    await fleet.worker._run_batch([fleet.inspect("phone-0", "first"),
                                   fleet.inspect("phone-0", "second")])
    scripts = fleet.scripts()
    assert len(scripts) == 2
    # The second script was computed for the counter the first one spends (a copy of the
    # SE's record from before the first would predict the same counter twice): the SE
    # accepts both, in order.
    await fleet.worker._run_batch(fleet.answer(scripts))
    replies = fleet.replies()
    assert {c: (r.ok, r.round_trips) for c, r in replies.items()} == {
        "first": (True, 1), "second": (True, 1),
    }
    assert fleet.counter("phone-0") == 2
    record = await SqlRegistry(tsm_db).get(fleet.identity("phone-0").cin)
    assert record.sequence_counter == 2


async def test_a_failed_batch_leaves_nothing_and_its_deliveries_then_run_one_by_one(
    tsm_db: Database, monkeypatch
) -> None:
    fleet = Fleet(tsm_db, 3)
    execute_many = registry_module.execute_many
    failed: list[str] = []

    async def failing_last_write_once(conn, sql, rows):  # noqa: ANN001, ANN202
        # After the inserts and the SEs' updates went out: they must roll back too.
        if sql is registry_module._UPDATE_OPERATION and not failed:
            failed.append(sql)
            raise RuntimeError("connection lost")
        return await execute_many(conn, sql, rows)

    monkeypatch.setattr(registry_module, "execute_many", failing_last_write_once)
    units = []
    unit = fleet.worker._registry.unit

    def counting_unit(prefetch: Prefetch | None = None):  # noqa: ANN202
        units.append(prefetch)
        return unit(prefetch)

    monkeypatch.setattr(fleet.worker._registry, "unit", counting_unit)
    await fleet.worker._run_batch([fleet.inspect(d, f"inspect-{d}") for d in fleet.elements])
    assert failed
    assert [len(p.commands) for p in units] == [3, 1, 1, 1]  # the batch, then one by one
    scripts = fleet.scripts()
    assert len(scripts) == 3  # the failed batch published nothing
    registry = SqlRegistry(tsm_db)
    for device_id, script in scripts:
        waiting = await registry.waiting_for(script.script_id)
        assert waiting is not None and waiting.command_id == f"inspect-{device_id}"
        # Spent once: the failed batch's counter did not stay behind.
        assert (await registry.get(fleet.identity(device_id).cin)).sequence_counter == 1
    await fleet.worker._run_batch(fleet.answer(scripts))
    replies = fleet.replies()
    assert all(r.ok and r.round_trips == 1 for r in replies.values()) and len(replies) == 3


async def test_a_unit_whose_writes_fail_at_its_end_rolls_back_the_ones_that_went_out(
    tsm_db: Database, monkeypatch
) -> None:
    registry = SqlRegistry(tsm_db)
    execute_many = registry_module.execute_many

    async def failing_operation_updates(conn, sql, rows):  # noqa: ANN001, ANN202
        if sql is registry_module._UPDATE_OPERATION:
            raise RuntimeError("connection lost")
        return await execute_many(conn, sql, rows)

    monkeypatch.setattr(registry_module, "execute_many", failing_operation_updates)
    record = _record()
    with pytest.raises(RuntimeError):
        async with registry.unit() as unit:
            await unit.add(record)
            await unit.begin("command", record.cin, "inspect")
            record.sequence_counter = 1
            await unit.suspend(record, "command", "script", b"state")
    monkeypatch.undo()
    assert await registry.operation("command") is None
    with pytest.raises(UnknownSecureElement):
        await registry.get(record.cin)


def _record() -> SeRecord:
    return SeRecord(cin="0102030405060708090A", kdd="0102030405060708090A",
                    device_id="phone-1", key_version=0x30, sequence_counter=0)


async def _two_operations_on_one_se(registry: Registry) -> None:
    """One unit: enrol an SE, suspend one operation on it, run a second, end both; every
    call sees the ones before it."""
    async with registry.unit() as unit:
        fresh = _record()
        before, element = await unit.begin("first", fresh.cin, "inspect")
        assert before is None and element is None
        await unit.add(fresh)
        element = await unit.get(fresh.cin)
        element.sequence_counter = 1
        await unit.suspend(element, "first", "script-1", b"state-1")
        before, element = await unit.begin("second", fresh.cin, "install")
        assert before is None and element is not None and element.sequence_counter == 1
        element.sequence_counter = 2
        await unit.suspend(element, "second", "script-2", b"state-2")
        waiting = await unit.waiting_for("script-1")
        assert waiting is not None and waiting.command_id == "first"
        assert waiting.status == "running" and waiting.state == b"state-1"
        await unit.complete(element, "first", b"reply-1", b"done-1")
        await unit.complete(None, "second", None)  # a transient failure
        assert await unit.waiting_for("script-2") is None
        again, _ = await unit.begin("first", fresh.cin, "inspect")
        assert again is not None and again.status == "done" and again.reply == b"reply-1"
    # Committed as the unit saw it.
    async with registry.unit() as unit:
        assert (await unit.get(fresh.cin)).sequence_counter == 2
        first = await unit.waiting_for("script-1")
        assert first is not None and (first.status, first.reply, first.state) == (
            "done", b"reply-1", b"done-1")
        second = await unit.operation("second")
        assert second is not None and second.status == "running"
        assert (second.script_id, second.state) == (None, None)


async def test_memory_registry_sees_its_own_writes() -> None:
    await _two_operations_on_one_se(MemoryRegistry())


async def test_sql_registry_sees_its_own_writes(tsm_db: Database) -> None:
    await _two_operations_on_one_se(SqlRegistry(tsm_db))


class _Prefetched(SqlRegistry):
    """Units that read the test's rows up front, as a batch's do."""

    def unit(self, prefetch: Prefetch | None = None):  # noqa: ANN202
        return super().unit(prefetch or Prefetch({"first": _record().cin, "second": _record().cin},
                                                 ["script-1", "script-2"]))


async def test_a_prefetched_unit_sees_its_own_writes(tsm_db: Database) -> None:
    await _two_operations_on_one_se(_Prefetched(tsm_db))


@pytest.mark.postgres
async def test_a_finished_operation_stays_finished_when_a_stale_unit_gives_up_on_it(
    pg_url: str, unique: str,
) -> None:
    """A replica's sweeper read the operation as waiting and gives up on its script, while
    another replica ends it with the phone's late answer: the stored reply stays, so a
    re-sent command is answered from it and not run again."""
    db = Database.for_service("tsm", url=pg_url, schema=f"tsm_{unique}")
    await db.ensure_schema()
    try:
        await upgrade(db, "tsm")
        registry = SqlRegistry(db)
        async with registry.unit() as unit:
            await unit.begin("command", _record().cin, "prepare")
            await unit.add(_record())
            await unit.suspend(_record(), "command", "script", b"state")
        async with registry.unit() as sweeper:
            stale = await sweeper.waiting_for("script")
            assert stale is not None and stale.status == "running"
            async with registry.unit() as answer:  # another connection, committed first
                await answer.complete(None, "command", b"the reply")
            await sweeper.complete(None, "command", None)
        async with registry.unit() as unit:
            finished = await unit.operation("command")
        assert finished is not None and (finished.status, finished.reply) == (
            "done", b"the reply")
    finally:
        await db.drop_schema()
        await db.close()
