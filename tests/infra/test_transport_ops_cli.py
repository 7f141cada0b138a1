"""``jpki ops parked list|replay`` and ``jpki ops queues`` against RabbitMQ.

The whole operator story: a malformed message and a message whose handler refused it
land in the parking lot with their reasons; the operator lists them, replays the one
that can now succeed, and it is consumed.
"""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
from click.testing import CliRunner

from infra.bus import Bus
from infra.transport.base import Outgoing
from infra.transport.rabbitmq import RabbitMQTransport
from jpki.cli import main
from protocol.envelope import Message, build, message_type
from protocol.errors import JpkiError

pytestmark = pytest.mark.rabbitmq


@message_type("tsm.cmd.opstest_install", 1)
class Install(msgspec.Struct, frozen=True):
    n: int


class NotYet(JpkiError):
    """Refused (rejected): the operator fixes the cause, then replays."""


async def jpki(*args: str) -> str:
    result = await asyncio.to_thread(CliRunner().invoke, main, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout  # the command's answer; warnings go to stderr


async def test_operator_lists_and_replays_parked_messages(amqp_url: str, unique: str) -> None:
    exchange, dlx, queue = f"jpki.test.{unique}", f"jpki.test.{unique}.dlx", f"tsm-{unique}"
    topology = ["--amqp-url", amqp_url, "--exchange", exchange, "--dead-letter-exchange", dlx]
    transport = RabbitMQTransport(amqp_url, exchange=exchange, dead_letter_exchange=dlx)
    await transport.connect()
    try:
        await transport.declare_queue(queue, ["tsm.cmd.#"])
        fixed = False
        handled: list[Message] = []
        consumed = asyncio.Event()

        async def handler(message: Message) -> None:
            if not fixed:
                raise NotYet("the TSM key file is missing")
            handled.append(message)
            consumed.set()

        await Bus(transport).subscribe(queue, handler)
        good = build(Install(1), saga_id="s1")
        await transport.publish([Outgoing("tsm.cmd.opstest_install", b"{oops", "bad-1")])
        await Bus(transport).publish(good)
        async with asyncio.timeout(10):
            while len(await transport.parked(queue)) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

        table = await jpki("ops", "parked", "list", "--queue", queue, *topology)
        assert "2 parked message(s)" in table
        listed = await jpki("ops", "parked", "list", "-q", queue, "--json", *topology)
        rows = {row["message_id"]: row for row in map(json.loads, listed.splitlines())}
        assert rows["bad-1"]["type"] == "?"
        assert rows["bad-1"]["reason"].startswith("InvalidMessage: not a valid envelope")
        good_id = good.envelope.message_id
        assert rows[good_id]["type"] == "tsm.cmd.opstest_install"
        assert rows[good_id]["reason"] == "handler failed: NotYet (rejected)"
        assert "TSM key file" not in table  # exception text never reaches the queue

        depths = await jpki("ops", "queues", "-q", queue, *topology)
        assert f"{queue}.parking" in depths and depths.split()[-1] == "2"

        fixed = True
        replayed = await jpki("ops", "parked", "replay", "-q", queue, "--id", good_id, *topology)
        assert replayed.strip() == f"replayed 1 message(s) to {queue}"
        await asyncio.wait_for(consumed.wait(), 10)
        assert [m.envelope.message_id for m in handled] == [good_id]
        left = await jpki("ops", "parked", "list", "-q", queue, "--json", *topology)
        assert [json.loads(line)["message_id"] for line in left.splitlines()] == ["bad-1"]
    finally:
        await transport.delete_topology()
        await transport.close()


def test_listing_an_unknown_queue_is_a_clear_error(amqp_url: str, unique: str) -> None:
    result = CliRunner().invoke(
        main, ["ops", "parked", "list", "-q", f"nope-{unique}", "--amqp-url", amqp_url]
    )
    assert result.exit_code != 0
    assert f"no parking lot for queue 'nope-{unique}'" in result.output


async def test_consumers_health_check_needs_a_consumer(amqp_url: str, unique: str) -> None:
    exchange, dlx, queue = f"jpki.test.{unique}", f"jpki.test.{unique}.dlx", f"hc-{unique}"
    transport = RabbitMQTransport(amqp_url, exchange=exchange, dead_letter_exchange=dlx)
    await transport.connect()
    check = ["ops", "consumers", "--queue", queue, "--amqp-url", amqp_url]
    try:
        await transport.declare_queue(queue, ["hc.#"])
        idle = await asyncio.to_thread(CliRunner().invoke, main, check)
        assert idle.exit_code == 1 and f"{queue}: 0 consumer(s)" in idle.output

        async def ignore(delivery: object) -> None:
            return None

        await transport.consume(queue, ignore)
        assert f"{queue}: 1 consumer(s)" in await jpki(*check)
        missing = await asyncio.to_thread(
            CliRunner().invoke, main, ["ops", "consumers", "--queue", f"absent-{unique}",
                                       "--amqp-url", amqp_url]
        )
        assert missing.exit_code == 1 and "is not declared" in missing.output
    finally:
        await transport.delete_topology()
        await transport.close()
