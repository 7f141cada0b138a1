"""The MQTT link against a real broker (Mosquitto): topics, order, sessions, reconnects."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import msgspec
import paho.mqtt.client as mqtt
import pytest
from structlog.testing import capture_logs

from infra.bus import ForeignMessage, InvalidDeviceId, RetryBackoff
from infra.mqtt import (
    MqttAddress,
    MqttPhoneLink,
    MqttSession,
    device_of,
    down_topic,
    up_topic,
)
from protocol.envelope import Message, build, encode, message_type


@message_type("app.cmd.mqtttest_show", 1)
class Show(msgspec.Struct, frozen=True):
    n: int


@message_type("app.event.mqtttest_tapped", 1)
class Tapped(msgspec.Struct, frozen=True):
    n: int


@message_type("ca.cmd.mqtttest_issue", 1)
class Issue(msgspec.Struct, frozen=True):
    n: int


FAST = RetryBackoff(base=0.05, cap=0.2)


def test_topics_and_device_ids() -> None:
    assert down_topic("dev-1") == "jpki/dev/dev-1/down"
    assert up_topic("dev-1") == "jpki/dev/dev-1/up"
    assert device_of("jpki/dev/dev-1/up") == "dev-1"
    for bad in ("jpki/dev/a/b/up", "other/dev/x/up", "jpki/dev/x/sideways", "jpki/dev//up"):
        with pytest.raises(InvalidDeviceId):
            device_of(bad)
    with pytest.raises(InvalidDeviceId):
        down_topic("a/+")


def test_address_keeps_the_password_out_of_repr() -> None:
    address = MqttAddress.from_url("mqtt://gw:s3cret%21@broker:8883")
    assert (address.hostname, address.port, address.username) == ("broker", 8883, "gw")
    assert address.password == "s3cret!"
    assert "s3cret" not in repr(address)


class Phone:
    def __init__(self) -> None:
        self.got: list[Message] = []
        self.changed = asyncio.Condition()

    async def __call__(self, message: Message) -> None:
        async with self.changed:
            self.got.append(message)
            self.changed.notify_all()

    async def wait_for(self, count: int, seconds: float = 10.0) -> list[Message]:
        """Wait for ``count`` distinct messages (a re-sent publish may arrive twice)."""
        async with asyncio.timeout(seconds):
            async with self.changed:
                await self.changed.wait_for(
                    lambda: len({m.envelope.message_id for m in self.got}) >= count
                )
        return self.got


@pytest.fixture
async def back_end(mqtt_url: str, unique: str) -> AsyncIterator[MqttSession]:
    session = MqttSession(mqtt_url, identifier=f"test-backend-{unique}", clean_session=True)
    await session.start()
    yield session
    await session.close()


@pytest.mark.mqtt
async def test_down_messages_arrive_decoded_and_in_order(
    mqtt_url: str, unique: str, back_end: MqttSession
) -> None:
    device = f"dev-{unique}"
    phone = Phone()
    link = MqttPhoneLink(mqtt_url, device, backoff=FAST)
    await link.start(phone)
    try:
        await asyncio.gather(
            *(
                back_end.publish(down_topic(device), encode(build(Show(n), device_id=device)))
                for n in range(50)
            )
        )
        got = await phone.wait_for(50)
        assert [m.body.n for m in got] == list(range(50))
    finally:
        await link.close(forget=True)


@pytest.mark.mqtt
async def test_garbage_on_the_down_topic_is_skipped_not_fatal(
    mqtt_url: str, unique: str, back_end: MqttSession
) -> None:
    device = f"dev-{unique}"
    phone = Phone()
    link = MqttPhoneLink(mqtt_url, device, backoff=FAST)
    await link.start(phone)
    try:
        await back_end.publish(down_topic(device), b"\x00not an envelope")
        await back_end.publish(down_topic(device), encode(build(Show(1), device_id=device)))
        (only,) = await phone.wait_for(1)
        assert only.body == Show(1)
    finally:
        await link.close(forget=True)


@pytest.mark.mqtt
async def test_phone_sends_up_and_may_not_send_foreign_messages(mqtt_url: str, unique: str) -> None:
    device = f"dev-{unique}"
    seen: list[bytes] = []
    arrived = asyncio.Event()

    async def on_up(message: mqtt.MQTTMessage) -> None:
        seen.append(message.payload)
        arrived.set()

    listener = MqttSession(
        mqtt_url,
        identifier=f"test-listener-{unique}",
        subscriptions=[up_topic(device)],
        on_message=on_up,
        clean_session=True,
    )
    await listener.start()
    link = MqttPhoneLink(mqtt_url, device, backoff=FAST)
    await link.start(Phone())
    try:
        with pytest.raises(ForeignMessage):
            await link.send(build(Issue(1), device_id=device))
        with pytest.raises(ForeignMessage):
            await link.send(build(Tapped(1), device_id="someone-else"))
        sent = build(Tapped(7), device_id=device)
        await link.send(sent)
        await asyncio.wait_for(arrived.wait(), 10)
        assert seen == [encode(sent)]
    finally:
        await link.close(forget=True)
        await listener.close()


@pytest.mark.mqtt
async def test_messages_sent_while_the_phone_is_offline_wait_in_its_session(
    mqtt_url: str, unique: str, back_end: MqttSession
) -> None:
    device = f"dev-{unique}"
    first = Phone()
    link = MqttPhoneLink(mqtt_url, device, backoff=FAST)
    await link.start(first)  # creates the persistent session and its subscription
    await link.close()
    for n in range(5):
        await back_end.publish(down_topic(device), encode(build(Show(n), device_id=device)))
    again = Phone()
    link = MqttPhoneLink(mqtt_url, device, backoff=FAST)
    await link.start(again)
    try:
        got = await again.wait_for(5)
        assert [m.body.n for m in got] == list(range(5))
        assert first.got == []
    finally:
        await link.close(forget=True)
    # a forgotten session keeps nothing: what is sent meanwhile is not waiting later
    await back_end.publish(down_topic(device), encode(build(Show(99), device_id=device)))
    last = Phone()
    link = MqttPhoneLink(mqtt_url, device, backoff=FAST)
    await link.start(last)
    await asyncio.sleep(0.5)
    await link.close(forget=True)
    assert last.got == []


@pytest.mark.mqtt
async def test_a_message_not_handled_before_a_crash_comes_back(
    mqtt_url: str, unique: str, back_end: MqttSession
) -> None:
    """Acked only after handling: a process gone mid-handling gets the message again."""
    topic = f"jpki/dev/dev-{unique}/down"
    started = asyncio.Event()

    async def hang(message: mqtt.MQTTMessage) -> None:
        started.set()
        await asyncio.Event().wait()  # never finishes: the process "dies" here

    doomed = MqttSession(
        mqtt_url, identifier=f"test-acker-{unique}", subscriptions=[topic], on_message=hang
    )
    await doomed.start()
    await back_end.publish(topic, b"payload-1")
    await asyncio.wait_for(started.wait(), 10)
    await doomed.close()

    redelivered: list[bytes] = []
    done = asyncio.Event()

    async def keep(message: mqtt.MQTTMessage) -> None:
        redelivered.append(message.payload)
        done.set()

    revived = MqttSession(
        mqtt_url, identifier=f"test-acker-{unique}", subscriptions=[topic], on_message=keep
    )
    await revived.start()
    try:
        await asyncio.wait_for(done.wait(), 10)
        assert redelivered == [b"payload-1"]
    finally:
        await revived.close(forget=True)  # leave no session behind on the shared broker


class CuttableProxy:
    """A TCP proxy in front of the broker whose connections the test can cut."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.answering = asyncio.Event()  # cleared: the broker's bytes wait in the proxy
        self.answering.set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers += [writer, up_writer]

        async def pipe(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, answers: bool = False
        ) -> None:
            try:
                while data := await src.read(65536):
                    if answers:
                        await self.answering.wait()
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer, answers=True))

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


@pytest.mark.mqtt
async def test_session_reconnects_with_backoff_and_loses_nothing(
    mqtt_url: str, unique: str
) -> None:
    broker = urlsplit(mqtt_url)
    proxy = CuttableProxy(broker.hostname or "127.0.0.1", broker.port or 1883)
    port = await proxy.start()
    device = f"dev-{unique}"
    phone = Phone()
    link = MqttPhoneLink(f"mqtt://127.0.0.1:{port}", device, backoff=FAST, rng=random.Random(1))
    sender = MqttSession(
        f"mqtt://127.0.0.1:{port}",
        identifier=f"test-sender-{unique}",
        backoff=FAST,
        clean_session=True,
    )
    await link.start(phone)
    await sender.start()
    try:
        for n in range(30):
            if n in (10, 20):
                proxy.cut()  # both sides lose the broker mid-run
            await sender.publish(down_topic(device), encode(build(Show(n), device_id=device)))
        got = await phone.wait_for(30, seconds=20)
        assert sorted({m.body.n for m in got}) == list(range(30))
        assert link._session is not None and link._session.connections >= 2
    finally:
        await sender.close()
        await link.close(forget=True)
        await proxy.close()


@pytest.mark.mqtt
async def test_a_publish_without_puback_in_time_is_sent_again(mqtt_url: str, unique: str) -> None:
    broker = urlsplit(mqtt_url)
    proxy = CuttableProxy(broker.hostname or "127.0.0.1", broker.port or 1883)
    port = await proxy.start()
    device = f"dev-{unique}"
    phone = Phone()
    link = MqttPhoneLink(mqtt_url, device, backoff=FAST, rng=random.Random(1))
    sender = MqttSession(
        f"mqtt://127.0.0.1:{port}",
        identifier=f"test-sender-{unique}",
        backoff=FAST,
        clean_session=True,
        publish_timeout=0.3,
    )
    await link.start(phone)
    await sender.start()
    try:
        proxy.answering.clear()  # the PUBACK does not come back (the connection stays up)
        with capture_logs() as logs:
            publishing = asyncio.create_task(
                sender.publish(down_topic(device), encode(build(Show(1), device_id=device)))
            )
            await asyncio.sleep(1.0)
            assert not publishing.done()
            retries = [e for e in logs if e["event"] == "mqtt.publish_retry"]
            assert retries and retries[0]["error"] == "no PUBACK in time"
            proxy.answering.set()
            await asyncio.wait_for(publishing, 10)
        got = await phone.wait_for(1)
        assert {m.body.n for m in got} == {1}  # sent more than once, the same message
    finally:
        proxy.answering.set()
        await sender.close()
        await link.close(forget=True)
        await proxy.close()


@pytest.mark.mqtt
async def test_a_message_larger_than_the_socket_takes_at_once_arrives_whole(
    mqtt_url: str, unique: str, back_end: MqttSession
) -> None:
    """paho writes what the socket takes; the rest waits for the socket to drain."""
    topic = f"jpki/dev/dev-{unique}/down"
    large = bytes(range(256)) * (256 * 1024)  # 64 MiB: more than a loopback socket takes
    got: list[bytes] = []
    arrived = asyncio.Event()

    async def keep(message: mqtt.MQTTMessage) -> None:
        got.append(message.payload)
        arrived.set()

    receiver = MqttSession(mqtt_url, identifier=f"test-large-{unique}", subscriptions=[topic],
                           on_message=keep, clean_session=True)
    await receiver.start()
    try:
        await asyncio.wait_for(back_end.publish(topic, large), 30)
        await asyncio.wait_for(arrived.wait(), 30)
        assert got == [large]
    finally:
        await receiver.close()
