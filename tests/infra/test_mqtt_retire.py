"""A retired shared-subscription session leaves the group for good, after acking what it
held; a session merely closed stays in the group and takes a share (mosquitto #1747)."""

from __future__ import annotations

import asyncio

import aiomqtt
import paho.mqtt.client as mqtt
import pytest

from infra.bus import RetryBackoff
from infra.mqtt import MqttAddress, MqttSession

pytestmark = pytest.mark.mqtt

FAST = RetryBackoff(base=0.05, cap=0.2)
MESSAGES = 20


async def _publish(mqtt_url: str, topic: str, count: int) -> None:
    address = MqttAddress.from_url(mqtt_url)
    async with aiomqtt.Client(address.hostname, address.port) as client:
        for n in range(count):
            await client.publish(topic, str(n).encode(), qos=1)


def _recorder(into: list[str]):
    async def record(message: mqtt.MQTTMessage) -> None:
        into.append(message.payload.decode())
    return record


async def _share_after_leaving(mqtt_url: str, unique: str, *, retire: bool) -> list[str]:
    """What the remaining member of a two-session group gets after the other one left."""
    shared = f"$share/g{unique}/r{unique}/+/up"
    left_with: list[str] = []
    stays_with: list[str] = []
    leaving = MqttSession(mqtt_url, identifier=f"leaving-{unique}", subscriptions=[shared],
                          on_message=_recorder(left_with), pipelined=True, backoff=FAST)
    staying = MqttSession(mqtt_url, identifier=f"staying-{unique}", subscriptions=[shared],
                          on_message=_recorder(stays_with), pipelined=True, backoff=FAST)
    await leaving.start()
    await staying.start()
    try:
        if retire:
            await leaving.retire()
        else:
            await leaving.close()
        await _publish(mqtt_url, f"r{unique}/dev-1/up", MESSAGES)
        await asyncio.sleep(1.0)  # a local broker delivers all in a few milliseconds
        return stays_with
    finally:
        await staying.close(forget=True)
        if not retire:
            await leaving.close(forget=True)


async def test_a_retired_session_leaves_every_message_to_the_group(
    mqtt_url: str, unique: str
) -> None:
    assert sorted(await _share_after_leaving(mqtt_url, unique, retire=True), key=int) == [
        str(n) for n in range(MESSAGES)
    ]


async def test_a_closed_persistent_session_keeps_a_share(mqtt_url: str, unique: str) -> None:
    """The broker behaviour retiring exists for: without it the group loses messages."""
    stays_with = await _share_after_leaving(mqtt_url, unique + "c", retire=False)
    assert 0 < len(stays_with) < MESSAGES


async def test_retire_acks_what_is_in_hand_before_ending_the_session(
    mqtt_url: str, unique: str
) -> None:
    topic = f"r{unique}/dev-1/up"
    handled: list[str] = []
    release = asyncio.Event()

    async def slow(message: mqtt.MQTTMessage) -> None:
        await release.wait()
        handled.append(message.payload.decode())

    session = MqttSession(mqtt_url, identifier=f"retiring-{unique}", subscriptions=[topic],
                          on_message=slow, pipelined=True, backoff=FAST)
    await session.start()
    await _publish(mqtt_url, topic, 5)
    retiring = asyncio.create_task(session.retire(drain_timeout=5))
    await asyncio.sleep(0.3)
    assert not retiring.done()  # waits for the messages in hand
    release.set()
    await asyncio.wait_for(retiring, 6)
    assert sorted(handled) == ["0", "1", "2", "3", "4"]

    # the session is gone: the same identifier comes back to no subscription and nothing
    # resent, and publishing to the topic reaches it no more
    again: list[str] = []
    returning = MqttSession(mqtt_url, identifier=f"retiring-{unique}",
                            on_message=_recorder(again), backoff=FAST)
    await returning.start()
    try:
        await _publish(mqtt_url, topic, 3)
        await asyncio.sleep(0.5)
        assert again == []
    finally:
        await returning.close(forget=True)
