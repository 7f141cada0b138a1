"""The SP-TSM as a service: commands on the ``tsm`` queue, scripts to ``device.<id>``,
answers back as ``se.result.script``, the registry in SQLite (in-process transport with
RabbitMQ semantics; the worker shell is ``workers/tsm/service.py``)."""

from __future__ import annotations

import asyncio

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


async def test_commands_over_the_bus_reach_the_se_and_come_back(tmp_path) -> None:
    ring = MasterKeyRing({0x30: MasterKeys.generate(0x30)}, 0x30)
    transport = InProcessTransport()
    await transport.connect()
    await declare_topology(transport)
    await transport.declare_queue("orchestrator.test", ["tsm.reply.#"])
    element: SecureElement = manufacture_secure_element(
        ring, bytes.fromhex("00112233445566778899"), JpkiAppletFactory(key_source=PooledKeys(2))
    )
    scripts_seen: list[m.SeScript] = []

    async def phone(delivery: Delivery) -> None:
        """The phone's app: run the script on the SE, answer with the responses."""
        message = decode(delivery.body)
        script = message.body
        assert isinstance(script, m.SeScript)
        scripts_seen.append(script)
        outcome = element.run_script(
            ScriptCommand(step.apdu, tuple(step.expect)) for step in script.steps
        )
        answer = build(
            m.SeScriptResult(script_id=script.script_id, responses=list(outcome.responses),
                             completed=outcome.completed),
            device_id=message.envelope.device_id,
            saga_id=message.envelope.saga_id,
            causation_id=message.envelope.message_id,
        )
        await transport.publish([outgoing(answer)])
        await delivery.ack()

    replies: asyncio.Queue[Message] = asyncio.Queue()

    async def orchestrator(delivery: Delivery) -> None:
        await replies.put(decode(delivery.body))
        await delivery.ack()

    await transport.consume(GATEWAY_QUEUE, phone)
    await transport.consume("orchestrator.test", orchestrator)
    db = Database.for_service("tsm", data_dir=tmp_path)
    worker = TsmWorker(db, transport, ring)
    await worker.start()
    try:
        identity = SeIdentity(cin="00112233445566778899", kdd="00112233445566778899")
        commands = [
            m.InspectSe(command_id="c-1", device_id="phone-7", se=identity),
            m.InstallApplet(command_id="c-2", device_id="phone-7", se=identity),
            m.InspectSe(command_id="c-3", device_id="phone-7", se=identity),
        ]
        answers = []
        for command in commands:
            request = build(command, saga_id="saga-1", device_id="phone-7")
            await transport.publish([outgoing(request)])
            answers.append(await asyncio.wait_for(replies.get(), 10))
        first, installed, second = (a.body for a in answers)
        assert isinstance(first, m.InspectSeReply) and not first.applet_present
        assert isinstance(installed, m.InstallAppletReply) and installed.installed
        assert isinstance(second, m.InspectSeReply) and second.applet_present
        assert all(a.envelope.saga_id == "saga-1" for a in answers)
        assert [a.envelope.type for a in answers] == [
            "tsm.reply.inspect", "tsm.reply.install", "tsm.reply.inspect",
        ]
        assert len(scripts_seen) == 3  # one round trip per operation
        record = await SqlRegistry(db).get(identity.cin)
        on_card = element.manager.domains[element.sp_sd_aid].sequence_counter
        assert record.sequence_counter == on_card == 3

        # A redelivered command gets the stored reply; the phone sees no new script.
        await transport.publish([outgoing(build(commands[1], saga_id="saga-1"))])
        again = await asyncio.wait_for(replies.get(), 10)
        assert again.body == installed and len(scripts_seen) == 3
    finally:
        await worker.stop()
        await transport.close()
        await db.close()
