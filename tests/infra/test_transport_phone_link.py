"""The in-process phone link: phones on the transport's device traffic, no broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest

from infra.bus import GATEWAY_QUEUE, Bus, ForeignMessage, declare_topology
from infra.transport.base import Outgoing
from infra.transport.inprocess import InProcessTransport
from infra.transport.phone_link import InProcessPhoneHub
from protocol.envelope import Message, build, message_type


@message_type("app.cmd.linktest_show", 1)
class Show(msgspec.Struct, frozen=True):
    n: int


@message_type("app.event.linktest_tapped", 1)
class Tapped(msgspec.Struct, frozen=True):
    n: int


@message_type("ca.cmd.linktest_issue", 1)
class Issue(msgspec.Struct, frozen=True):
    n: int


@pytest.fixture
async def wired() -> AsyncIterator[tuple[Bus, InProcessPhoneHub]]:
    transport = InProcessTransport()
    await transport.connect()
    await declare_topology(transport)
    bus = Bus(transport)
    hub = InProcessPhoneHub(bus)
    await hub.start()
    yield bus, hub
    await hub.close()
    await transport.close()


async def settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0)


async def test_each_phone_gets_its_own_messages_in_order(
    wired: tuple[Bus, InProcessPhoneHub],
) -> None:
    bus, hub = wired
    inboxes: dict[str, list[int]] = {"p1": [], "p2": []}
    all_in = asyncio.Event()

    def inbox(device: str):
        async def on_message(message: Message) -> None:
            await asyncio.sleep(0.001 * (message.body.n % 3))  # uneven handling times
            inboxes[device].append(message.body.n)
            if sum(map(len, inboxes.values())) == 40:
                all_in.set()

        return on_message

    for device in inboxes:
        await hub.link(device).start(inbox(device))
    await bus.publish(*(build(Show(n), device_id=f"p{1 + n % 2}") for n in range(40)))
    await asyncio.wait_for(all_in.wait(), 5)
    assert inboxes["p1"] == list(range(0, 40, 2))
    assert inboxes["p2"] == list(range(1, 40, 2))


async def test_an_offline_phone_gets_its_messages_when_it_attaches(
    wired: tuple[Bus, InProcessPhoneHub],
) -> None:
    bus, hub = wired
    await bus.publish(*(build(Show(n), device_id="late") for n in range(3)))
    await settle()
    assert hub.waiting("late") == 3
    assert (await bus.transport.queue_depths())[GATEWAY_QUEUE] == 0
    got: list[int] = []

    async def on_message(message: Message) -> None:
        got.append(message.body.n)

    await hub.link("late").start(on_message)
    await bus.publish(build(Show(3), device_id="late"))
    await settle()
    assert got == [0, 1, 2, 3]
    assert hub.waiting("late") == 0


async def test_garbage_for_a_phone_is_skipped(wired: tuple[Bus, InProcessPhoneHub]) -> None:
    bus, hub = wired
    got: list[int] = []

    async def on_message(message: Message) -> None:
        got.append(message.body.n)

    await hub.link("p1").start(on_message)
    await bus.transport.publish([Outgoing("device.p1", b"garbage", "g1")])
    await bus.publish(build(Show(5), device_id="p1"))
    await settle()
    assert got == [5]


async def test_phone_sends_up_by_type_and_nothing_foreign(
    wired: tuple[Bus, InProcessPhoneHub],
) -> None:
    bus, hub = wired
    received: list[Message] = []

    async def orchestrator(message: Message) -> None:
        received.append(message)

    await bus.subscribe("orchestrator", orchestrator)
    link = hub.link("p1")
    await link.start(lambda message: asyncio.sleep(0))
    with pytest.raises(ForeignMessage):
        await link.send(build(Issue(1), device_id="p1"))
    with pytest.raises(ForeignMessage):
        await link.send(build(Tapped(1), device_id="p2"))
    await link.send(build(Tapped(2), device_id="p1", saga_id="s1"))
    await settle()
    assert [m.body for m in received] == [Tapped(2)]
    assert await bus.transport.parked("ca") == []
