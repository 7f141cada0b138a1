"""Transport semantics, one suite for every implementation (in-process and RabbitMQ).

Each test uses its own queue names (and, on RabbitMQ, its own exchanges), so runs and
parallel test sessions never see each other's messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from infra.transport.base import (
    DELIVERY_LIMIT_REASON,
    Delivery,
    Outgoing,
    TopologyMismatch,
    Transport,
    Unroutable,
    parking_lot,
)
from infra.transport.inprocess import InProcessTransport, topic_matches

TRANSPORTS = ["inprocess", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)]


@pytest.fixture(params=TRANSPORTS)
async def transport(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[Transport]:
    if request.param == "inprocess":
        made: Transport = InProcessTransport(default_delivery_limit=3)
    else:
        amqp_url = request.getfixturevalue("amqp_url")
        from infra.transport.rabbitmq import RabbitMQTransport

        made = RabbitMQTransport(
            amqp_url,
            exchange=f"jpki.test.{unique}",
            dead_letter_exchange=f"jpki.test.{unique}.dlx",
            default_delivery_limit=3,
        )
    await made.connect()
    try:
        yield made
    finally:
        if request.param == "rabbitmq":
            await made.delete_topology()  # type: ignore[attr-defined]
        await made.close()


class Recorder:
    """A handler that records what it sees and settles each delivery as told."""

    def __init__(self, action: Callable[[Delivery], Awaitable[None]] | None = None) -> None:
        self.deliveries: list[Delivery] = []
        self.action = action
        self.changed = asyncio.Condition()

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        async with self.changed:
            self.changed.notify_all()
        if self.action is not None:
            await self.action(delivery)

    async def wait_for(self, count: int, seconds: float = 10.0) -> list[Delivery]:
        async with asyncio.timeout(seconds):
            async with self.changed:
                await self.changed.wait_for(lambda: len(self.deliveries) >= count)
        return self.deliveries

    @property
    def ids(self) -> list[str]:
        return [d.message_id for d in self.deliveries]


async def ack(delivery: Delivery) -> None:
    await delivery.ack()


async def retry(delivery: Delivery) -> None:
    await delivery.retry()


def out(key: str, n: int, **headers: str) -> Outgoing:
    body = f'{{"n":{n}}}'.encode()
    return Outgoing(routing_key=key, body=body, message_id=f"m{n}", headers=headers)


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> None:
    """Poll a broker-side condition (queue depths have no change notification)."""
    async with asyncio.timeout(seconds):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def depth(transport: Transport, queue: str) -> int:
    return (await transport.queue_depths()).get(queue, -1)


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("tsm.cmd.#", "tsm.cmd.install", True),
        ("tsm.cmd.#", "tsm.cmd", True),  # '#' matches zero words
        ("tsm.cmd.#", "tsm.reply.install", False),
        ("*.reply.#", "ca.reply.issue", True),
        ("*.reply.#", "reply.issue", False),
        ("*.reply.#", "a.b.reply.x", False),
        ("device.*", "device.d1", True),
        ("device.*", "device.d1.x", False),
        ("#", "anything.at.all", True),
        ("a.#.z", "a.z", True),
        ("a.#.z", "a.b.c.z", True),
        ("a.#.z", "a.b.c", False),
    ],
)
def test_topic_patterns_match_like_amqp(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


async def test_routes_by_pattern_and_acks(transport: Transport, unique: str) -> None:
    tsm, ca = f"tsm-{unique}", f"ca-{unique}"
    await transport.declare_queue(tsm, ["tsm.cmd.#"])
    await transport.declare_queue(tsm, ["tsm.cmd.#"])  # idempotent
    await transport.declare_queue(ca, ["ca.cmd.#"])
    await transport.publish([out("tsm.cmd.install", 1, trace="t1"), out("ca.cmd.issue", 2)])
    tsm_seen, ca_seen = Recorder(ack), Recorder(ack)
    subs = [await transport.consume(tsm, tsm_seen), await transport.consume(ca, ca_seen)]
    (got,) = await tsm_seen.wait_for(1)
    await ca_seen.wait_for(1)
    assert (got.routing_key, got.body, got.message_id) == ("tsm.cmd.install", b'{"n":1}', "m1")
    assert got.headers.get("trace") == "t1"
    assert (got.redelivered, got.delivery_count) == (False, 1)
    assert ca_seen.ids == ["m2"]
    await eventually(lambda: _zero(transport, tsm))
    for sub in subs:
        await sub.cancel()


async def _zero(transport: Transport, queue: str) -> bool:
    return await depth(transport, queue) == 0


async def test_unroutable_message_is_refused_not_lost(transport: Transport, unique: str) -> None:
    await transport.declare_queue(f"q-{unique}", ["bound.#"])
    with pytest.raises(Unroutable):
        await transport.publish([out(f"nobody.listens.{unique}", 1)])


async def test_retry_redelivers_then_parks_past_delivery_limit(
    transport: Transport, unique: str
) -> None:
    queue = f"q-{unique}"
    await transport.declare_queue(queue, ["work.#"], delivery_limit=2)
    await transport.publish([out("work.x", 1)])
    seen = Recorder(retry)
    sub = await transport.consume(queue, seen)
    await eventually(lambda: _parked_count(transport, queue, 1))
    await sub.cancel()
    # limit 2: the first delivery and two retries, then the third failure parks it
    assert [(d.redelivered, d.delivery_count) for d in seen.deliveries] == [
        (False, 1),
        (True, 2),
        (True, 3),
    ]
    (parked,) = await transport.parked(queue)
    assert (parked.message_id, parked.routing_key, parked.body) == ("m1", "work.x", b'{"n":1}')
    assert parked.reason == DELIVERY_LIMIT_REASON
    assert parked.queue == queue
    # (on RabbitMQ the listing's return to the lot shows in the counts a moment later)
    await eventually(lambda: _depths_are(transport, {queue: 0, parking_lot(queue): 1}))


async def _depths_are(transport: Transport, expected: dict[str, int]) -> bool:
    depths = await transport.queue_depths()
    return all(depths.get(name) == count for name, count in expected.items())


async def _parked_count(transport: Transport, queue: str, count: int) -> bool:
    return len(await transport.parked(queue)) >= count


async def test_park_keeps_reason_and_replay_brings_it_back(
    transport: Transport, unique: str
) -> None:
    queue = f"q-{unique}"
    await transport.declare_queue(queue, ["work.#"])
    await transport.publish([out("work.a", 1), out("work.b", 2), out("work.c", 3)])

    async def park_first_pass(delivery: Delivery) -> None:
        if len(first.deliveries) <= 3:
            await delivery.park(f"cannot handle {delivery.message_id}")
        else:
            await delivery.ack()

    first = Recorder(park_first_pass)
    sub = await transport.consume(queue, first)
    await eventually(lambda: _parked_count(transport, queue, 3))
    parked = await transport.parked(queue)
    assert sorted((p.message_id, p.routing_key, p.reason) for p in parked) == [
        ("m1", "work.a", "cannot handle m1"),
        ("m2", "work.b", "cannot handle m2"),
        ("m3", "work.c", "cannot handle m3"),
    ]
    assert all(p.parked_at > 0 for p in parked)
    # listing does not consume: a second look sees the same messages
    assert len(await transport.parked(queue)) == 3

    assert await transport.replay_parked(queue, ["m2"]) == 1
    await first.wait_for(4)
    replayed = first.deliveries[3]
    assert (replayed.message_id, replayed.routing_key) == ("m2", "work.b")
    assert replayed.body == b'{"n":2}'
    assert sorted(p.message_id for p in await transport.parked(queue)) == ["m1", "m3"]

    assert await transport.replay_parked(queue) == 2
    await first.wait_for(6)
    assert sorted(first.ids[4:]) == ["m1", "m3"]
    assert await transport.parked(queue) == []
    await sub.cancel()


async def test_prefetch_bounds_unsettled_deliveries(transport: Transport, unique: str) -> None:
    queue = f"q-{unique}"
    await transport.declare_queue(queue, ["work.#"])
    await transport.publish([out("work.x", n) for n in range(5)])
    held = Recorder()  # settles nothing by itself
    sub = await transport.consume(queue, held, prefetch=2)
    await held.wait_for(2)
    await asyncio.sleep(0.3)
    assert len(held.deliveries) == 2
    await held.deliveries[0].ack()
    await held.wait_for(3)
    await asyncio.sleep(0.3)
    assert len(held.deliveries) == 3
    for delivery in held.deliveries[1:]:
        await delivery.ack()
    await held.wait_for(5)
    for delivery in held.deliveries[3:]:
        await delivery.ack()
    assert held.ids == [f"m{n}" for n in range(5)]
    await sub.cancel()


async def test_cancelled_consumer_unacked_deliveries_are_redelivered(
    transport: Transport, unique: str
) -> None:
    queue = f"q-{unique}"
    await transport.declare_queue(queue, ["work.#"])
    await transport.publish([out("work.x", 1), out("work.x", 2)])
    gone = Recorder()
    sub = await transport.consume(queue, gone, prefetch=10)
    await gone.wait_for(2)
    await gone.deliveries[0].ack()
    await sub.cancel()
    # settling after the consumer went away changes nothing: the message comes back
    await gone.deliveries[1].ack()
    survivor = Recorder(ack)
    sub2 = await transport.consume(queue, survivor)
    (again,) = await survivor.wait_for(1)
    assert (again.message_id, again.redelivered) == ("m2", True)
    assert again.delivery_count == 2
    await asyncio.sleep(0.2)
    assert survivor.ids == ["m2"]
    await sub2.cancel()


async def test_handler_exception_retries_the_delivery(transport: Transport, unique: str) -> None:
    queue = f"q-{unique}"
    await transport.declare_queue(queue, ["work.#"])
    await transport.publish([out("work.x", 1)])

    async def fail_once(delivery: Delivery) -> None:
        if not delivery.redelivered:
            raise RuntimeError("handler bug")
        await delivery.ack()

    seen = Recorder(fail_once)
    sub = await transport.consume(queue, seen)
    await seen.wait_for(2)
    assert [d.redelivered for d in seen.deliveries] == [False, True]
    await eventually(lambda: _zero(transport, queue))
    await sub.cancel()


async def test_single_active_consumer_keeps_one_reader(transport: Transport, unique: str) -> None:
    queue = f"q-{unique}"
    await transport.declare_queue(queue, ["work.#"], single_active_consumer=True)
    first, second = Recorder(ack), Recorder(ack)
    sub1 = await transport.consume(queue, first)
    sub2 = await transport.consume(queue, second)
    await transport.publish([out("work.x", n) for n in range(20)])
    await first.wait_for(20)
    assert second.deliveries == []
    await sub1.cancel()
    await transport.publish([out("work.x", n) for n in range(20, 25)])
    await second.wait_for(5)
    assert second.ids == [f"m{n}" for n in range(20, 25)]
    await sub2.cancel()


async def test_round_robin_between_competing_consumers(transport: Transport, unique: str) -> None:
    queue = f"q-{unique}"
    await transport.declare_queue(queue, ["work.#"])
    first, second = Recorder(ack), Recorder(ack)
    sub1 = await transport.consume(queue, first, prefetch=1)
    sub2 = await transport.consume(queue, second, prefetch=1)
    await transport.publish([out("work.x", n) for n in range(40)])
    await eventually(lambda: _all_seen(first, second, 40))
    assert first.deliveries and second.deliveries
    assert sorted(first.ids + second.ids) == sorted(f"m{n}" for n in range(40))
    await sub1.cancel()
    await sub2.cancel()


async def _all_seen(a: Recorder, b: Recorder, n: int) -> bool:
    return len(a.deliveries) + len(b.deliveries) >= n


async def test_a_message_refused_at_the_edge_is_parked_and_replayable(
    transport: Transport, unique: str
) -> None:
    queue = f"edge-{unique}"
    await transport.declare_queue(queue, [])
    await transport.park(queue, out("jpki.dev.x.up", 1, source="mqtt"), "InvalidMessage: bad")
    (parked,) = await transport.parked(queue)
    assert (parked.message_id, parked.routing_key) == ("m1", "jpki.dev.x.up")
    assert (parked.reason, parked.headers.get("source")) == ("InvalidMessage: bad", "mqtt")
    seen = Recorder(ack)
    sub = await transport.consume(queue, seen)
    assert await transport.replay_parked(queue) == 1
    (replayed,) = await seen.wait_for(1)
    assert (replayed.routing_key, replayed.headers.get("source")) == ("jpki.dev.x.up", "mqtt")
    assert replayed.body == b'{"n":1}'
    await sub.cancel()


async def test_redeclaring_a_queue_with_other_arguments_is_refused(
    transport: Transport, unique: str
) -> None:
    queue = f"q-{unique}"
    await transport.declare_queue(queue, ["work.#"], delivery_limit=3)
    await transport.declare_queue(queue, ["more.#"], delivery_limit=3)  # same: fine
    with pytest.raises(TopologyMismatch):
        await transport.declare_queue(queue, ["work.#"], delivery_limit=4)
    with pytest.raises(TopologyMismatch):
        await transport.declare_queue(queue, ["work.#"], single_active_consumer=True)
