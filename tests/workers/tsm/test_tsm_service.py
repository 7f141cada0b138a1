"""The TSM service shell under the load that used to wedge it: more commands than the
queue's prefetch, each waiting for a phone whose answer comes back on the same queue; two
replicas on one queue (an answer reaches the replica that did not send the script); a
random-challenge SE (two scripts per operation); a phone that never answers."""

from __future__ import annotations

import asyncio

import pytest

from device_sim.se.card_manager import ChallengeMode
from device_sim.se.element import ScriptCommand, SecureElement
from device_sim.se.jpki_applet import JpkiAppletFactory, PooledKeys
from infra.bus import GATEWAY_QUEUE, declare_topology
from infra.db.database import Database
from infra.db.outbox import outgoing
from infra.transport.base import Delivery
from infra.transport.inprocess import InProcessTransport
from orchestrator.messages import SeIdentity
from protocol.envelope import Message, build, decode
from workers.tsm import messages as m
from workers.tsm.keys import MasterKeyRing, MasterKeys
from workers.tsm.provisioning import manufacture_secure_element
from workers.tsm.registry import SqlRegistry
from workers.tsm.service import TsmWorker

SILENT = "phone-silent"


class World:
    def __init__(self, tmp_path, count: int, *, random_challenge: set[int] = frozenset(),
                 db: Database | None = None) -> None:
        self.ring = MasterKeyRing({0x30: MasterKeys.generate(0x30)}, 0x30)
        self.transport = InProcessTransport()
        self.db = db or Database.for_service("tsm", data_dir=tmp_path)
        factory = JpkiAppletFactory(key_source=PooledKeys(2))
        self.elements: dict[str, SecureElement] = {}
        for n in range(count):
            mode = ChallengeMode.RANDOM if n in random_challenge else ChallengeMode.PSEUDO_RANDOM
            self.elements[f"phone-{n}"] = manufacture_secure_element(
                self.ring, n.to_bytes(10, "big"), factory, challenge_mode=mode
            )
        self.scripts: dict[str, int] = {}
        self.replies: asyncio.Queue[Message] = asyncio.Queue()
        self.workers: list[TsmWorker] = []

    def identity(self, device_id: str) -> SeIdentity:
        cin = self.elements[device_id].identity.cin.hex().upper()
        return SeIdentity(cin=cin, kdd=cin)

    async def start(self, replicas: int, prefetch: int, timeout_s: float = 10.0) -> None:
        await self.transport.connect()
        await declare_topology(self.transport)
        await self.transport.declare_queue("orchestrator.test", ["tsm.reply.#"])
        await self.transport.consume(GATEWAY_QUEUE, self._phone)
        await self.transport.consume("orchestrator.test", self._orchestrator)
        for _ in range(replicas):
            worker = TsmWorker(self.db, self.transport, self.ring, prefetch=prefetch,
                               script_timeout_s=timeout_s)
            await worker.start()
            self.workers.append(worker)

    async def stop(self) -> None:
        await self.stop_transport()
        await self.db.close()

    async def stop_transport(self) -> None:
        for worker in self.workers:
            await worker.stop()
        await self.transport.close()

    async def _phone(self, delivery: Delivery) -> None:
        message = decode(delivery.body)
        device_id = message.envelope.device_id
        await delivery.ack()
        if device_id == SILENT:
            return
        script = message.body
        self.scripts[device_id] = self.scripts.get(device_id, 0) + 1
        outcome = self.elements[device_id].run_script(
            ScriptCommand(step.apdu, tuple(step.expect)) for step in script.steps
        )
        answer = build(
            m.SeScriptResult(script_id=script.script_id, responses=list(outcome.responses),
                             completed=outcome.completed),
            device_id=device_id, saga_id=message.envelope.saga_id,
        )
        await self.transport.publish([outgoing(answer)])

    async def _orchestrator(self, delivery: Delivery) -> None:
        await self.replies.put(decode(delivery.body))
        await delivery.ack()

    async def send(self, commands: list[m.TsmCommand]) -> dict[str, m.TsmReply]:
        await self.transport.publish(
            [outgoing(build(c, saga_id=f"saga-{c.command_id}", device_id=c.device_id))
             for c in commands]
        )
        answers: dict[str, m.TsmReply] = {}
        while len(answers) < len(commands):
            reply = await asyncio.wait_for(self.replies.get(), 20)
            assert reply.envelope.saga_id == f"saga-{reply.body.command_id}"
            answers[reply.body.command_id] = reply.body
        return answers


async def test_more_commands_than_prefetch_and_two_replicas_all_answered(tmp_path) -> None:
    world = World(tmp_path, 40, random_challenge={3, 17})
    await world.start(replicas=2, prefetch=2)
    try:
        await _two_replicas_answer_everything(world)
    finally:
        await world.stop()


@pytest.mark.postgres
async def test_two_replicas_on_postgresql_answer_everything(tmp_path, pg_url, unique) -> None:
    # Each delivery is one transaction that spans the script's computation; on PostgreSQL
    # two replicas run them concurrently on their own connections.
    db = Database.for_service("tsm", url=pg_url, schema=f"tsm_{unique}")
    await db.ensure_schema()
    world = World(tmp_path, 40, random_challenge={3, 17}, db=db)
    try:
        await world.start(replicas=2, prefetch=2)
        await _two_replicas_answer_everything(world)
    finally:
        await world.stop_transport()
        await db.drop_schema()
        await db.close()


async def _two_replicas_answer_everything(world: World) -> None:
    installs = [
        m.InstallApplet(command_id=f"install-{d}", device_id=d, se=world.identity(d))
        for d in world.elements
    ]
    answers = await world.send(installs)
    assert all(a.ok and a.installed for a in answers.values())
    both = [w.scripts_sent for w in world.workers]
    assert all(both), f"one replica sent no script: {both}"
    # One script per operation; a random-challenge SE met for the first time needs three
    # (the first tells its mode, then two rounds).
    for n, device_id in enumerate(world.elements):
        expected = 3 if n in (3, 17) else 1
        assert world.scripts[device_id] == expected
        assert answers[f"install-{device_id}"].round_trips == expected
    registry = SqlRegistry(world.db)
    for n, (device_id, element) in enumerate(world.elements.items()):
        if n in (3, 17):
            continue  # a random-challenge SE's counter predicts nothing
        record = await registry.get(world.identity(device_id).cin)
        assert record.sequence_counter == (
            element.manager.domains[element.sp_sd_aid].sequence_counter
        )
    # The commands again: stored replies, no new script.
    again = await world.send(installs)
    assert again == answers
    assert sum(world.scripts.values()) == 44


async def test_a_phone_that_never_answers_ends_in_a_transient_failure(tmp_path) -> None:
    world = World(tmp_path, 1)
    await world.start(replicas=1, prefetch=4, timeout_s=0.5)
    try:
        identity = world.identity("phone-0")
        answers = await world.send([
            m.InspectSe(command_id="lost", device_id=SILENT, se=identity),
        ])
        reply = answers["lost"]
        assert reply.failure is not None and reply.failure.code is m.ErrorCode.PHONE_UNREACHABLE
        assert reply.failure.transient
        # Not recorded as done: the same command id runs again once the phone is back.
        answers = await world.send([
            m.InspectSe(command_id="lost", device_id="phone-0", se=identity),
        ])
        # The lost script spent a counter value on the TSM's side only: the SE's IU answer
        # tells its real counter and the operation re-syncs (resumed from the registry).
        assert answers["lost"].ok and answers["lost"].round_trips == 2
        assert world.scripts["phone-0"] == 2
    finally:
        await world.stop()


async def test_a_result_nobody_waits_for_is_dropped(tmp_path) -> None:
    world = World(tmp_path, 1)
    await world.start(replicas=1, prefetch=4)
    try:
        stray = build(m.SeScriptResult(script_id="ab" * 16, responses=[b"\x90\x00"],
                                       completed=True), device_id="phone-0")
        await world.transport.publish([outgoing(stray)])
        identity = world.identity("phone-0")
        answers = await world.send([m.InspectSe(command_id="c", device_id="phone-0",
                                                se=identity)])
        assert answers["c"].ok
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(world.replies.get(), 0.3)
    finally:
        await world.stop()


def _counting_transactions(db: Database):  # noqa: ANN202 - a list and a stand-in method
    """``db.transaction`` that also counts the transactions opened (into the list)."""
    opened: list[int] = []
    transaction = db.transaction

    def counting():  # noqa: ANN202 - the database's own context manager
        opened.append(1)
        return transaction()

    return opened, counting


async def test_one_transaction_per_delivery_and_a_failed_start_leaves_nothing(
    tmp_path, monkeypatch
) -> None:
    from infra.db.migrate import upgrade
    from workers.tsm.engine import OperationContext, TsmEngine, Waiting

    world = World(tmp_path, 1)
    await upgrade(world.db, "tsm")
    engine = TsmEngine(world.ring, SqlRegistry(world.db), link=None)
    opened, counting = _counting_transactions(world.db)
    monkeypatch.setattr(world.db, "transaction", counting)
    identity = world.identity("phone-0")
    try:
        # A failure while the first script is computed: neither the SE (met for the first
        # time) nor the operation is recorded, so the redelivered command starts afresh.
        def broken(state: object) -> bytes:
            raise RuntimeError("disk full")

        monkeypatch.setattr(engine, "_seal_state", broken)
        with pytest.raises(RuntimeError):
            await engine.start(m.InspectSe(command_id="c", device_id="phone-0", se=identity),
                               OperationContext())
        monkeypatch.undo()
        monkeypatch.setattr(world.db, "transaction", counting)
        registry = SqlRegistry(world.db)
        assert await registry.operation("c") is None
        with pytest.raises(Exception, match="not in the registry"):
            await registry.get(identity.cin)

        # First contact: enrol, begin and suspend commit as one transaction.
        opened.clear()
        step = await engine.start(
            m.InspectSe(command_id="c", device_id="phone-0", se=identity), OperationContext()
        )
        assert isinstance(step, Waiting)
        assert len(opened) == 1
        stored = await registry.operation("c")
        assert stored is not None and stored.script_id == step.script.script_id
        outcome = world.elements["phone-0"].run_script(
            ScriptCommand(s.apdu, tuple(s.expect)) for s in step.script.steps
        )
        result = m.SeScriptResult(script_id=step.script.script_id,
                                  responses=list(outcome.responses), completed=True)
        opened.clear()
        finished = await engine.resume(result, result.script_id)
        assert finished is not None and finished.reply.ok
        assert len(opened) == 1  # the look-up by script id and the outcome together
    finally:
        await world.db.close()


async def test_an_answer_for_a_busy_se_waits_for_it_outside_the_transaction(tmp_path) -> None:
    # While another task holds the SE's lock (and may need the database), the answer's
    # look-up must not hold the database while it waits for that lock.
    from infra.db.migrate import upgrade
    from workers.tsm.engine import OperationContext, TsmEngine, Waiting

    world = World(tmp_path, 1)
    await upgrade(world.db, "tsm")
    registry = SqlRegistry(world.db)
    engine = TsmEngine(world.ring, registry, link=None)
    identity = world.identity("phone-0")
    try:
        step = await engine.start(
            m.InspectSe(command_id="c", device_id="phone-0", se=identity), OperationContext()
        )
        assert isinstance(step, Waiting)
        outcome = world.elements["phone-0"].run_script(
            ScriptCommand(s.apdu, tuple(s.expect)) for s in step.script.steps
        )
        result = m.SeScriptResult(script_id=step.script.script_id,
                                  responses=list(outcome.responses), completed=True)
        busy = engine._locks[identity.cin] = asyncio.Lock()
        await busy.acquire()
        resumed = asyncio.create_task(engine.resume(result, result.script_id))
        await asyncio.sleep(0.05)
        assert not resumed.done()
        # The lock's holder can still use the database (with the inline SQLite store a
        # transaction held by the waiting answer would block this for ever).
        try:
            operation = await asyncio.wait_for(registry.operation("c"), 2)
        finally:
            busy.release()
        assert operation is not None and operation.status == "running"
        finished = await asyncio.wait_for(resumed, 5)
        assert finished is not None and finished.reply.ok
    finally:
        await world.db.close()


async def test_deliveries_commit_in_batches_and_a_bad_one_costs_only_itself(
    tmp_path, monkeypatch
) -> None:
    world = World(tmp_path, 30)
    await world.start(replicas=1, prefetch=64)
    worker = world.workers[0]
    opened, counting = _counting_transactions(world.db)
    monkeypatch.setattr(world.db, "transaction", counting)
    start = worker.engine.start
    failed_once: set[str] = set()

    async def start_failing_once(command, context, **kwargs):  # noqa: ANN001, ANN202
        if command.command_id == "inspect-phone-7" and not failed_once:
            failed_once.add(command.command_id)
            raise RuntimeError("store fault")
        return await start(command, context, **kwargs)

    monkeypatch.setattr(worker.engine, "start", start_failing_once)
    try:
        commands = [m.InspectSe(command_id=f"inspect-{d}", device_id=d, se=world.identity(d))
                    for d in world.elements]
        answers = await world.send(commands)
        assert all(answer.ok for answer in answers.values())
        assert failed_once == {"inspect-phone-7"}  # it failed, was retried and answered
        assert world.scripts == dict.fromkeys(world.elements, 1)
        # 60 deliveries (30 commands, 30 script results) in far fewer commits; the failed
        # batch's deliveries ran once more one by one, and the bad one was retried
        assert len(opened) < 60, len(opened)
    finally:
        await world.stop()
