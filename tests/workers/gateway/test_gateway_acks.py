"""The up path acks the phone's MQTT message only once the bus has it.

A gateway whose bus refuses publishes keeps the phone's message unacknowledged; when
that gateway dies and comes back under its name (its persistent MQTT session), the
broker hands the message over again and it reaches the bus: nothing is lost in between.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

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


class SlowConfirms(InProcessTransport):
    """An in-process bus whose confirms take a while, like a broker's; counts publishes."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        self.batches.append(len(messages))
        await asyncio.sleep(0.02)
        await super().publish(messages)


async def test_up_messages_go_out_in_batches_each_device_in_order(
    mqtt_url: str, unique: str
) -> None:
    async with _gateway_and_phones(mqtt_url, unique, "batch", 10) as (bus, gateway, phones, got):

        async def send_five(phone: MqttPhoneLink) -> None:
            for n in range(5):
                await phone.send(build(Tapped(n), device_id=phone.device_id))

        await asyncio.gather(*(send_five(phone) for phone in phones))
        async with asyncio.timeout(15):
            while len({m.envelope.message_id for m in got}) < 50:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    for phone in phones:
        sent = [m.body.n for m in got if m.envelope.device_id == phone.device_id]
        assert sent == sorted(sent) and set(sent) == set(range(5))
    assert gateway.stats.up == 50
    assert len(bus.batches) < 50 and max(bus.batches) > 1  # several messages per publish


async def _append(got: list[Message], message: Message) -> None:
    got.append(message)


@contextlib.asynccontextmanager
async def _gateway_and_phones(
    mqtt_url: str, unique: str, name: str, phones: int
) -> AsyncIterator[tuple[SlowConfirms, Gateway, list[MqttPhoneLink], list[Message]]]:
    """A gateway over a slow-confirming bus whose orchestrator queue takes ``app.event.#``
    (what it gets is collected), and ``phones`` started phone links under its topic root."""
    root, group = f"jpki-test-{unique}/dev", f"gw-{unique}"
    bus = SlowConfirms()
    await bus.connect()
    await bus.declare_queue("orchestrator", ["app.event.#"])
    got: list[Message] = []
    await Bus(bus).subscribe("orchestrator", lambda message: _append(got, message))
    gateway = Gateway(bus, mqtt_url, name=f"g-{unique}", topic_root=root, share_group=group,
                      backoff=FAST)
    await gateway.start()
    links = [MqttPhoneLink(mqtt_url, f"{name}-{unique}-{p}", topic_root=root, backoff=FAST)
             for p in range(phones)]
    try:
        for link in links:
            await link.start(lambda message: asyncio.sleep(0))
        yield bus, gateway, links, got
    finally:
        for link in links:
            await link.close(forget=True)
        await gateway.stop(forget=True)


@message_type("se.result.acktest_ran", 1)
class Ran(msgspec.Struct, frozen=True):
    n: int


async def test_an_unroutable_message_in_a_batch_is_parked_and_the_rest_delivered(
    mqtt_url: str, unique: str
) -> None:
    # the orchestrator queue takes app.event.# only: nothing takes se.result.*
    async with _gateway_and_phones(mqtt_url, unique, "mixed", 6) as (bus, gateway, phones, got):
        await asyncio.gather(*(
            phone.send(build(Ran(p) if p % 2 else Tapped(p), device_id=phone.device_id))
            for p, phone in enumerate(phones)
        ))
        async with asyncio.timeout(15):
            while len(got) < 3 or gateway.stats.parked < 3:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    assert sorted(m.body.n for m in got) == [0, 2, 4]
    parked = await bus.parked(gateway.up_queue)
    assert sorted(p.reason.split(":")[0] for p in parked) == ["Unroutable"] * 3
    assert gateway.stats.up == 3
