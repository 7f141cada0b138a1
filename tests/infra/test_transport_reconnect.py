"""RabbitMQ: a connection the broker closes (an operator, a network drop) comes back with
its consumers, and nothing is lost.

The consumer reads aiormq's deliveries directly, so the robust connection no longer
restores it by itself: the subscription starts it again on the reopened channel. The
broker closes only this test's connection (management API), not anyone else's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import quote, urlsplit

import aiohttp
import pytest
from structlog.testing import capture_logs

from infra.transport.base import Delivery, Outgoing, TransportError
from infra.transport.rabbitmq import RabbitMQTransport
from tests.e2e.conftest import MANAGEMENT_URL
from tests.infra.test_transport import Recorder, ack, depth, eventually, out
from tests.services import unavailable

pytestmark = pytest.mark.rabbitmq



def _authorization(amqp_url: str) -> dict[str, str]:
    parts = urlsplit(amqp_url)
    user, password = parts.username or "guest", parts.password or "guest"
    return {"Authorization": aiohttp.encode_basic_auth(user, password)}


async def close_connection_at_broker(amqp_url: str, connection_name: str) -> None:
    """Ask the broker to close the client connection named ``connection_name`` (it shows
    in the management API after its first statistics interval, a second or two)."""
    async with aiohttp.ClientSession(headers=_authorization(amqp_url)) as http:
        async with asyncio.timeout(15):
            while True:
                async with http.get(f"{MANAGEMENT_URL}/api/connections") as answer:
                    answer.raise_for_status()
                    rows = await answer.json()
                names = [
                    row["name"] for row in rows
                    if row.get("client_properties", {}).get("connection_name") == connection_name
                ]
                if names:
                    break
                await asyncio.sleep(0.2)
        for name in names:
            async with http.delete(f"{MANAGEMENT_URL}/api/connections/{quote(name, safe='')}",
                                   headers={"X-Reason": "test closes it"}) as answer:
                answer.raise_for_status()


@pytest.fixture
async def transport(amqp_url: str, unique: str) -> AsyncIterator[RabbitMQTransport]:
    try:
        async with aiohttp.ClientSession(headers=_authorization(amqp_url)) as http:
            async with http.get(f"{MANAGEMENT_URL}/api/overview") as answer:
                answer.raise_for_status()
    except aiohttp.ClientError:
        unavailable(f"*** RabbitMQ management API not reachable at {MANAGEMENT_URL}: test"
                    " SKIPPED (rabbitmq-plugins enable rabbitmq_management) ***")
    made = RabbitMQTransport(
        amqp_url,
        exchange=f"jpki.test.{unique}",
        dead_letter_exchange=f"jpki.test.{unique}.dlx",
        connection_name=f"jpki-test-{unique}",
        reconnect_interval=0.2,
    )
    await made.connect()
    try:
        yield made
    finally:
        await made.delete_topology()
        await made.close()


async def publish_until_confirmed(transport: RabbitMQTransport, messages: list[Outgoing]) -> None:
    async with asyncio.timeout(30):
        while True:
            try:
                await transport.publish(messages)
                return
            except TransportError:  # still reconnecting: publish again (at least once)
                await asyncio.sleep(0.1)


async def test_consumer_comes_back_after_the_broker_closed_the_connection(
    transport: RabbitMQTransport, unique: str
) -> None:
    queue = f"q-{unique}"
    await transport.declare_queue(queue, ["work.#"])
    first_m1: list[Delivery] = []

    async def hold_first_m1_else_ack(delivery: Delivery) -> None:
        if delivery.message_id == "m1" and not first_m1:
            first_m1.append(delivery)  # in hand when the connection goes
            return
        await delivery.ack()

    recorder = Recorder(hold_first_m1_else_ack)
    await transport.consume(queue, recorder, prefetch=10)
    await transport.publish([out("work.x", n) for n in range(1, 6)])
    await recorder.wait_for(5)

    await close_connection_at_broker(transport._url, f"jpki-test-{unique}")
    await publish_until_confirmed(transport, [out("work.x", n) for n in range(6, 11)])
    await first_m1[0].ack()  # too late, on the old channel: harmless, the broker requeued it

    async with asyncio.timeout(20):
        while {f"m{n}" for n in range(1, 11)} - set(recorder.ids):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    again = [d for d in recorder.deliveries if d.message_id == "m1"]
    assert len(again) == 2 and again[1].redelivered
    await eventually(lambda: _empty(transport, queue), seconds=20)


async def _empty(transport: RabbitMQTransport, queue: str) -> bool:
    return await depth(transport, queue) == 0


async def test_consumer_comes_back_after_the_broker_cancelled_it(
    transport: RabbitMQTransport, unique: str
) -> None:
    queue = f"q-{unique}"
    await transport.declare_queue(queue, ["work.#"])
    recorder = Recorder(ack)
    await transport.consume(queue, recorder, prefetch=10)
    # an operator deletes the queue under the consumer (the broker cancels it), then the
    # queue is declared again
    with capture_logs() as logs:
        async with transport._conn().channel() as channel:
            await channel.queue_delete(queue)
        async with asyncio.timeout(10):
            while not any(e["event"] == "transport.consumer_waits_for_queue" for e in logs):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    await transport.declare_queue(queue, ["work.#"])
    await publish_until_confirmed(transport, [out("work.x", 1)])
    assert (await recorder.wait_for(1, seconds=20))[0].message_id == "m1"
