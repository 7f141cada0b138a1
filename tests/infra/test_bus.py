"""The typed bus on the in-process transport: decode, park, retry, context, metrics."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import msgspec
import pytest
import structlog

from infra import metrics
from infra.bus import (
    GATEWAY_QUEUE,
    Bus,
    InvalidDeviceId,
    RetryBackoff,
    declare_topology,
    routing_key_for,
)
from infra.transport.base import DELIVERY_LIMIT_REASON, Outgoing, Transport
from infra.transport.inprocess import InProcessTransport
from protocol.envelope import Message, build, message_type
from protocol.errors import Disposition, JpkiError


@message_type("tsm.cmd.bustest_ping", 1)
class Ping(msgspec.Struct, frozen=True):
    n: int


@message_type("tsm.reply.bustest_pong", 1)
class Pong(msgspec.Struct, frozen=True):
    n: int


@message_type("se.cmd.bustest_script", 1)
class Script(msgspec.Struct, frozen=True):
    apdus: list[str]


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


class Flaky(JpkiError):
    disposition = Disposition.TRANSIENT


class Refused(JpkiError):
    pass


@pytest.fixture
async def transport() -> AsyncIterator[Transport]:
    made = InProcessTransport(default_delivery_limit=3)
    await made.connect()
    await declare_topology(made)
    yield made
    await made.close()


def make_bus(transport: Transport) -> tuple[Bus, list[float]]:
    slept: list[float] = []

    async def no_sleep(delay: float) -> None:
        slept.append(delay)

    return Bus(transport, rng=random.Random(7), sleep=no_sleep), slept


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.arrived = asyncio.Event()

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)
        self.arrived.set()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_publish_routes_by_type_and_handler_gets_typed_body(transport: Transport) -> None:
    bus, _ = make_bus(transport)
    inbox = Inbox()
    await bus.subscribe("tsm", inbox)
    sent = build(Ping(1), saga_id="s1")
    await bus.publish(sent)
    await asyncio.wait_for(inbox.arrived.wait(), 2)
    (got,) = inbox.messages
    assert got.body == Ping(1)
    assert got.envelope.message_id == sent.envelope.message_id
    assert (await transport.queue_depths())["tsm"] == 0


async def test_reply_follows_saga_device_and_causation(transport: Transport) -> None:
    bus, _ = make_bus(transport)
    replies = Inbox()
    await bus.subscribe("orchestrator", replies)

    async def answer(message: Message) -> None:
        await bus.reply(message, Pong(message.body.n + 1))

    await bus.subscribe("tsm", answer)
    request = build(Ping(41), saga_id="s9", device_id="dev-1")
    await bus.publish(request)
    await asyncio.wait_for(replies.arrived.wait(), 2)
    (reply,) = replies.messages
    assert reply.body == Pong(42)
    assert (reply.envelope.saga_id, reply.envelope.device_id) == ("s9", "dev-1")
    assert reply.envelope.causation_id == request.envelope.message_id


def test_phone_bound_messages_route_to_the_device() -> None:
    assert routing_key_for(build(Script(["00A4"]), device_id="dev-7")) == "device.dev-7"
    assert routing_key_for(build(Ping(1), device_id="dev-7")) == "tsm.cmd.bustest_ping"
    with pytest.raises(InvalidDeviceId):
        routing_key_for(build(Script([])))
    with pytest.raises(InvalidDeviceId):
        routing_key_for(build(Script([]), device_id="a.b"))
    with pytest.raises(InvalidDeviceId):
        routing_key_for(build(Script([]), device_id="+/#"))


async def test_phone_bound_message_reaches_the_gateway_queue(transport: Transport) -> None:
    bus, _ = make_bus(transport)
    await bus.publish(build(Script(["00A4040000"]), device_id="dev-7"))
    assert (await transport.queue_depths())[GATEWAY_QUEUE] == 1


@pytest.mark.parametrize(
    ("raw", "reason_start"),
    [
        (b"not json at all", "InvalidMessage: not a valid envelope"),
        (
            b'{"message_id":"x","type":"nobody.cmd.knows","schema_version":1,'
            b'"sent_at":"2026-01-01T00:00:00Z","body":{}}',
            "UnknownMessageType: unknown message type 'nobody.cmd.knows' v1",
        ),
        (
            b'{"message_id":"x","type":"tsm.cmd.bustest_ping","schema_version":1,'
            b'"sent_at":"2026-01-01T00:00:00Z","body":{"n":"one"}}',
            "InvalidMessage: tsm.cmd.bustest_ping v1: Expected `int`",
        ),
    ],
)
async def test_undecodable_message_is_parked_with_its_reason(
    transport: Transport, raw: bytes, reason_start: str
) -> None:
    bus, _ = make_bus(transport)
    inbox = Inbox()
    await bus.subscribe("tsm", inbox)
    before = sample("jpki_messages_parked_total", queue="tsm", reason="invalid")
    await transport.publish([Outgoing("tsm.cmd.bustest_ping", raw, "bad-1")])
    await settle()
    (parked,) = await transport.parked("tsm")
    assert parked.reason.startswith(reason_start), parked.reason
    assert (parked.message_id, parked.body) == ("bad-1", raw)
    assert inbox.messages == []
    assert sample("jpki_messages_parked_total", queue="tsm", reason="invalid") == before + 1
    # the consumer survived: a good message still gets through
    await bus.publish(build(Ping(2)))
    await asyncio.wait_for(inbox.arrived.wait(), 2)


async def test_transient_error_is_retried_with_backoff_then_succeeds(transport: Transport) -> None:
    bus, slept = make_bus(transport)
    attempts: list[int] = []

    async def flaky(message: Message) -> None:
        attempts.append(message.body.n)
        if len(attempts) < 3:
            raise Flaky("broker hiccup")

    await bus.subscribe("tsm", flaky)
    await bus.publish(build(Ping(5)))
    await settle()
    assert attempts == [5, 5, 5]
    assert await transport.parked("tsm") == []
    backoff = RetryBackoff()
    assert len(slept) == 2
    assert backoff.base / 2 <= slept[0] <= backoff.base
    assert backoff.base <= slept[1] <= 2 * backoff.base


async def test_transient_error_forever_ends_in_the_parking_lot(transport: Transport) -> None:
    bus, _ = make_bus(transport)
    attempts = 0

    async def always_down(message: Message) -> None:
        nonlocal attempts
        attempts += 1
        raise TimeoutError

    await bus.subscribe("tsm", always_down)
    await bus.publish(build(Ping(5)))
    await settle()
    (parked,) = await transport.parked("tsm")
    assert parked.reason == DELIVERY_LIMIT_REASON
    assert attempts == 4  # delivery limit 3: first try and three retries


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (Refused("card signature forged, pin=1234"), "handler failed: Refused (rejected)"),
        (KeyError("temp_pin 5678"), "handler failed: KeyError (bug)"),
    ],
)
async def test_rejected_error_parks_at_once_with_the_type_only(
    transport: Transport, error: Exception, reason: str
) -> None:
    bus, _ = make_bus(transport)
    attempts = 0

    async def refuse(message: Message) -> None:
        nonlocal attempts
        attempts += 1
        raise error

    await bus.subscribe("tsm", refuse)
    await bus.publish(build(Ping(5)))
    await settle()
    (parked,) = await transport.parked("tsm")
    assert parked.reason == reason
    assert "1234" not in parked.reason and "5678" not in parked.reason
    assert attempts == 1


async def test_handler_runs_with_message_context_bound(transport: Transport) -> None:
    bus, _ = make_bus(transport)
    seen: list[dict[str, object]] = []

    async def look(message: Message) -> None:
        seen.append(structlog.contextvars.get_contextvars())

    await bus.subscribe("tsm", look)
    message = build(Ping(1), saga_id="saga-3", device_id="dev-3")
    await bus.publish(message)
    await settle()
    (context,) = seen
    assert context["saga_id"] == "saga-3"
    assert context["device_id"] == "dev-3"
    assert context["message_type"] == "tsm.cmd.bustest_ping"
    assert context["message_id"] == message.envelope.message_id
    assert "saga_id" not in structlog.contextvars.get_contextvars()


async def test_metrics_count_in_and_out(transport: Transport) -> None:
    bus, _ = make_bus(transport)
    out_before = sample("jpki_messages_out_total", type="tsm.cmd.bustest_ping")
    acked = {"queue": "tsm", "type": "tsm.cmd.bustest_ping", "outcome": "ack"}
    in_before = sample("jpki_messages_in_total", **acked)
    inbox = Inbox()
    await bus.subscribe("tsm", inbox)
    await bus.publish(*(build(Ping(n)) for n in range(3)))
    await settle()
    assert len(inbox.messages) == 3
    assert sample("jpki_messages_out_total", type="tsm.cmd.bustest_ping") == out_before + 3
    assert sample("jpki_messages_in_total", **acked) == in_before + 3
    metrics.update_queue_depths(await transport.queue_depths())
    assert sample("jpki_queue_depth", queue="tsm") == 0
    assert sample("jpki_parking_lot_messages", queue="tsm") == 0
