"""The gateway on real RabbitMQ and Mosquitto: two gateways at once, per-device order
through a failover, shared subscription, malformed messages parked, listed and replayed.

Every test uses its own exchanges, queues, topic root and share group, so it never sees
another run's traffic on the shared brokers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import msgspec
import pytest

from infra.bus import Bus, RetryBackoff
from infra.mqtt import MqttPhoneLink, MqttSession, up_topic
from infra.transport.base import Outgoing
from infra.transport.rabbitmq import RabbitMQTransport
from protocol.envelope import Message, build, encode, message_type
from workers.gateway.service import TOPIC_HEADER, Gateway

pytestmark = [pytest.mark.rabbitmq, pytest.mark.mqtt]

FAST = RetryBackoff(base=0.05, cap=0.5)


@message_type("app.cmd.gwtest_show", 1)
class Show(msgspec.Struct, frozen=True):
    n: int


@message_type("app.event.gwtest_tapped", 1)
class Tapped(msgspec.Struct, frozen=True):
    n: int


@message_type("ca.cmd.gwtest_issue", 1)
class Issue(msgspec.Struct, frozen=True):
    n: int


@dataclass
class Env:
    unique: str
    amqp_url: str
    mqtt_url: str
    bus: Bus
    root: str
    orchestrator_queue: str
    transports: list[RabbitMQTransport]

    async def transport(self) -> RabbitMQTransport:
        made = RabbitMQTransport(
            self.amqp_url,
            exchange=f"jpki.test.{self.unique}",
            dead_letter_exchange=f"jpki.test.{self.unique}.dlx",
        )
        await made.connect()
        self.transports.append(made)
        return made

    async def gateway(self, name: str) -> Gateway:
        gateway = Gateway(
            await self.transport(),
            self.mqtt_url,
            name=f"{name}-{self.unique}",
            topic_root=self.root,
            share_group=f"gw-{self.unique}",
            down_queue=f"gateway.down-{self.unique}",
            up_queue=f"gateway.up-{self.unique}",
            backoff=FAST,
        )
        await gateway.start()
        return gateway

    def phone(self, device: str) -> MqttPhoneLink:
        return MqttPhoneLink(self.mqtt_url, device, topic_root=self.root, backoff=FAST)


@pytest.fixture
async def env(amqp_url: str, mqtt_url: str, unique: str) -> AsyncIterator[Env]:
    environment = Env(unique, amqp_url, mqtt_url, None, f"jpki-test-{unique}/dev", "", [])  # type: ignore[arg-type]
    transport = await environment.transport()
    environment.bus = Bus(transport)
    environment.orchestrator_queue = f"orchestrator-{unique}"
    await transport.declare_queue(environment.orchestrator_queue, ["app.event.#"])
    yield environment
    for made in environment.transports:  # each deletes what it declared
        await made.delete_topology()
        await made.close()


class Collector:
    def __init__(self, expected: int) -> None:
        self.messages: list[Message] = []
        self.expected = expected
        self.done = asyncio.Event()

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)
        if len({m.envelope.message_id for m in self.messages}) >= self.expected:
            self.done.set()


async def test_up_messages_from_many_phones_cross_both_gateways(env: Env) -> None:
    first, second = await env.gateway("a"), await env.gateway("b")
    received = Collector(100)
    await env.bus.subscribe(env.orchestrator_queue, received)
    phones = {f"up{i}-{env.unique}": env.phone(f"up{i}-{env.unique}") for i in range(4)}
    for link in phones.values():
        await link.start(lambda message: asyncio.sleep(0))
    sent = [build(Tapped(n), device_id=device) for n in range(25) for device in phones]

    async def send_all(device: str) -> None:
        for message in sent:
            if message.envelope.device_id == device:
                await phones[device].send(message)

    try:
        await asyncio.gather(*(send_all(device) for device in phones))
        await asyncio.wait_for(received.done.wait(), 20)
        assert {m.envelope.message_id for m in received.messages} == {
            m.envelope.message_id for m in sent
        }
        assert all(m.body == Tapped(m.body.n) for m in received.messages)
        # the shared subscription spread the phones' messages over both gateways
        assert first.stats.up > 0 and second.stats.up > 0
        assert first.stats.up + second.stats.up >= 100
    finally:
        for link in phones.values():
            await link.close(forget=True)
        await first.stop(forget=True)
        await second.stop(forget=True)


class PhoneInbox:
    def __init__(self) -> None:
        self.ids: list[str] = []
        self.numbers: list[int] = []

    async def __call__(self, message: Message) -> None:
        self.ids.append(message.envelope.message_id)
        self.numbers.append(message.body.n)

    def first_seen(self) -> list[int]:
        """Numbers in arrival order with repeats (a failover may resend) removed."""
        seen: set[int] = set()
        order = []
        for n in self.numbers:
            if n not in seen:
                seen.add(n)
                order.append(n)
        return order


async def test_down_messages_keep_per_device_order_through_a_gateway_failover(env: Env) -> None:
    active, standby = await env.gateway("active"), await env.gateway("standby")
    devices = [f"down{i}-{env.unique}" for i in range(4)]
    inboxes = {device: PhoneInbox() for device in devices}
    links = [env.phone(device) for device in devices]
    for link, device in zip(links, devices, strict=True):
        await link.start(inboxes[device])

    def batch(numbers: range) -> list[Message]:
        return [build(Show(n), device_id=devices[n % 4]) for n in numbers]

    async def delivered(count: int) -> None:
        async with asyncio.timeout(20):
            while sum(len(set(box.numbers)) for box in inboxes.values()) < count:  # noqa: ASYNC110
                await asyncio.sleep(0.02)

    try:
        await env.bus.publish(*batch(range(0, 200)))
        await delivered(60)
        assert standby.stats.down == 0  # single active consumer: one gateway forwards
        await active.stop()  # mid-stream: the standby takes over the queue
        await env.bus.publish(*batch(range(200, 400)))
        await delivered(400)
        for index, device in enumerate(devices):
            assert inboxes[device].first_seen() == list(range(index, 400, 4)), device
        assert active.stats.down > 0 and standby.stats.down > 0
    finally:
        for link in links:
            await link.close(forget=True)
        await active.stop(forget=True)
        await standby.stop(forget=True)


async def test_malformed_up_messages_are_parked_listed_and_replayed(env: Env) -> None:
    gateway = await env.gateway("edge")
    received = Collector(1)
    await env.bus.subscribe(env.orchestrator_queue, received)
    device = f"edge-{env.unique}"
    raw_phone = MqttSession(env.mqtt_url, identifier=f"raw-{env.unique}", clean_session=True)
    await raw_phone.start()
    transport = env.transports[0]
    try:
        topic = up_topic(device, env.root)
        await raw_phone.publish(topic, b"{not json")
        await raw_phone.publish(topic, encode(build(Issue(1), device_id=device)))
        await raw_phone.publish(topic, encode(build(Tapped(1), device_id="someone-else")))
        async with asyncio.timeout(10):
            while len(await transport.parked(gateway.up_queue)) < 3:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        reasons = sorted(p.reason for p in await transport.parked(gateway.up_queue))
        assert reasons[0].startswith("ForeignMessage: a phone may not send ca.cmd.gwtest_issue")
        assert reasons[1] == "ForeignMessage: envelope device id does not match the link's device"
        assert reasons[2].startswith("InvalidMessage: not a valid envelope")
        assert all(
            p.headers.get(TOPIC_HEADER) == topic for p in await transport.parked(gateway.up_queue)
        )

        # Replayed, they are validated again: still bad, so back in the lot, never forwarded.
        assert await transport.replay_parked(gateway.up_queue) == 3
        async with asyncio.timeout(10):
            while gateway.stats.parked < 6:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            # Parked copies reach the lot's queue a moment after the gateway's confirm.
            while len(await transport.parked(gateway.up_queue)) < 3:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert len(await transport.parked(gateway.up_queue)) == 3
        assert received.messages == []

        # A parked message that passes now (here: put in the lot by hand) is forwarded.
        good = build(Tapped(9), device_id=device)
        await transport.park(
            gateway.up_queue,
            Outgoing(topic, encode(good), good.envelope.message_id, {TOPIC_HEADER: topic}),
            "operator test",
        )
        assert await transport.replay_parked(gateway.up_queue, [good.envelope.message_id]) == 1
        await asyncio.wait_for(received.done.wait(), 10)
        assert [m.envelope.message_id for m in received.messages] == [good.envelope.message_id]
    finally:
        await raw_phone.close()
        await gateway.stop(forget=True)
