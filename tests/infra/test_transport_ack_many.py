"""``Transport.ack_many``: a committed batch acked at once (one merged frame on RabbitMQ).

A merged ack (``multiple``) covers every unsettled delivery up to its tag, so it must stop
below a delivery still in hand: what was not acked comes back when the consumer goes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from infra.transport.base import Delivery, Subscription, Transport
from infra.transport.inprocess import InProcessTransport
from infra.transport.rabbitmq import RabbitMQTransport
from tests.infra.test_transport import TRANSPORTS, Recorder, depth, eventually, out


@pytest.fixture(params=TRANSPORTS)
async def transport(request: pytest.FixtureRequest, unique: str) -> AsyncIterator[Transport]:
    made: Transport
    if request.param == "inprocess":
        made = InProcessTransport()
    else:
        made = RabbitMQTransport(request.getfixturevalue("amqp_url"),
                                 exchange=f"jpki.test.{unique}",
                                 dead_letter_exchange=f"jpki.test.{unique}.dlx")
    await made.connect()
    try:
        yield made
    finally:
        if isinstance(made, RabbitMQTransport):
            await made.delete_topology()
        await made.close()


async def _hold(delivery: Delivery) -> None:
    """Leave the delivery unsettled (as the inbox consumer does until its batch commits)."""


async def _held(
    transport: Transport, queue: str, count: int
) -> tuple[Recorder, Subscription, list[Delivery]]:
    """``count`` messages m1, m2, ... published to ``queue`` and delivered, all left in hand."""
    await transport.declare_queue(queue, ["work.#"])
    await transport.publish([out("work.x", n) for n in range(1, count + 1)])
    held = Recorder(_hold)
    sub = await transport.consume(queue, held, prefetch=10)
    return held, sub, await held.wait_for(count)


async def test_ack_many_leaves_a_delivery_in_hand_unacked(
    transport: Transport, unique: str
) -> None:
    queue = f"q-{unique}"
    held, sub, in_hand = await _held(transport, queue, 6)
    deliveries = {d.message_id: d for d in in_hand}
    # m3 is still being handled and m6 belongs to the next batch
    await transport.ack_many([deliveries[m] for m in ("m1", "m2", "m4", "m5")])
    await sub.cancel()
    await eventually(lambda: _depth_is(transport, queue, 2))
    again = Recorder(_hold)
    sub = await transport.consume(queue, again, prefetch=10)
    await again.wait_for(2)
    await asyncio.sleep(0.2)  # nothing else comes
    assert sorted(again.ids) == ["m3", "m6"]
    await transport.ack_many(again.deliveries)
    await sub.cancel()
    await eventually(lambda: _depth_is(transport, queue, 0))


async def test_ack_many_skips_settled_deliveries(transport: Transport, unique: str) -> None:
    queue = f"q-{unique}"
    held, sub, (first, second, third) = await _held(transport, queue, 3)
    await first.ack()
    await second.retry()  # requeued: it comes back as a new delivery
    redelivered = (await held.wait_for(4))[3]
    assert redelivered.message_id == second.message_id and redelivered.redelivered
    # settled ones are skipped: acking one twice would cost the channel on RabbitMQ
    await transport.ack_many([first, second, third, redelivered])
    await transport.ack_many([third])
    await transport.publish([out("work.x", 9)])
    assert (await held.wait_for(5))[4].message_id == "m9"
    await transport.ack_many([held.deliveries[4]])
    await sub.cancel()
    await eventually(lambda: _depth_is(transport, queue, 0))


async def _depth_is(transport: Transport, queue: str, count: int) -> bool:
    return await depth(transport, queue) == count


async def test_acks_and_retries_asked_for_together_settle_each_one(
    transport: Transport, unique: str
) -> None:
    queue = f"q-{unique}"
    held, sub, in_hand = await _held(transport, queue, 6)
    deliveries = {d.message_id: d for d in in_hand}
    # one round of the event loop: merged into one block on RabbitMQ, m6 still in hand
    await asyncio.gather(deliveries["m1"].ack(), deliveries["m2"].ack(),
                         deliveries["m3"].retry(), deliveries["m4"].ack(),
                         deliveries["m5"].ack())
    again = (await held.wait_for(7))[6]
    assert again.message_id == "m3" and again.redelivered
    await sub.cancel()
    await eventually(lambda: _depth_is(transport, queue, 2))  # m3 (again unsettled) and m6
