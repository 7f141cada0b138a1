"""The up path acks the phone's MQTT message only once the bus has it.

A gateway whose bus refuses publishes keeps the phone's message unacknowledged; when
that gateway dies and comes back under its name (its persistent MQTT session), the
broker hands the message over again and it reaches the bus: nothing is lost in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import msgspec
import pytest

from infra.bus import Bus, RetryBackoff
from infra.mqtt import MqttPhoneLink
from infra.transport.base import Outgoing, TransportError
from infra.transport.inprocess import InProcessTransport
from protocol.envelope import Message, build, message_type
from workers.gateway.service import Gateway

pytestmark = pytest.mark.mqtt

FAST = RetryBackoff(base=0.05, cap=0.2)


@message_type("app.event.acktest_tapped", 1)
class Tapped(msgspec.Struct, frozen=True):
    n: int


class BrokerDown(InProcessTransport):
    """An in-process bus whose publishes fail while ``down`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.down = True
        self.refused = 0

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        if self.down:
            self.refused += 1
            raise TransportError("broker unreachable")
        await super().publish(messages)


async def test_unconfirmed_up_message_survives_a_gateway_crash(mqtt_url: str, unique: str) -> None:
    root, group, device = f"jpki-test-{unique}/dev", f"gw-{unique}", f"ack-{unique}"
    failing = BrokerDown()
    await failing.connect()
    await failing.declare_queue("orchestrator", ["app.event.#"])

    def gateway(transport: InProcessTransport) -> Gateway:
        return Gateway(
            transport,
            mqtt_url,
            name=f"g-{unique}",
            topic_root=root,
            share_group=group,
            backoff=FAST,
        )

    first = gateway(failing)
    await first.start()
    phone = MqttPhoneLink(mqtt_url, device, topic_root=root, backoff=FAST)
    await phone.start(lambda message: asyncio.sleep(0))
    sent = build(Tapped(1), device_id=device)
    await phone.send(sent)
    async with asyncio.timeout(10):
        while failing.refused < 2:  # noqa: ASYNC110 - the gateway keeps retrying
            await asyncio.sleep(0.02)
    await first.stop()  # dies with the phone's message unacknowledged
    assert first.stats.up == 0

    working = InProcessTransport()
    await working.connect()
    await working.declare_queue("orchestrator", ["app.event.#"])
    got: list[Message] = []
    arrived = asyncio.Event()

    async def orchestrator(message: Message) -> None:
        got.append(message)
        arrived.set()

    await Bus(working).subscribe("orchestrator", orchestrator)
    revived = gateway(working)
    await revived.start()
    try:
        await asyncio.wait_for(arrived.wait(), 15)
        assert [m.envelope.message_id for m in got] == [sent.envelope.message_id]
        assert revived.stats.up == 1
    finally:
        await phone.close(forget=True)
        await revived.stop(forget=True)
