"""The gateway between the phones' MQTT topics and the AMQP bus.

Up (phone to back end): every gateway subscribes to ``$share/jpki-gateway/<root>/+/up``,
so the broker gives each message to one gateway of the group. The gateway validates the
envelope (it must decode, be a type a phone may send, and name the device of its topic)
and republishes the phone's bytes unchanged on AMQP under the envelope type. What
arrives while a batch waits for RabbitMQ's confirms forms the next batch, published as
one block of frames: a busy gateway writes many messages per ``send``, an idle one adds
no delay, and with one batch in flight each device's messages keep their order. It
acknowledges the MQTT message only after RabbitMQ confirmed the publish; while the bus
is unreachable it keeps retrying, and MQTT's flow control holds the phones back. A
payload that fails validation is parked in the ``gateway.up`` parking lot with its reason
(listed and replayed like any other: a replayed message is validated again and forwarded
if it now passes, say after the gateway learned a new schema).

Down (back end to phone): messages routed ``device.<id>`` land in the ``gateway.down``
quorum queue, which has a single active consumer. With several gateways one forwards
and the others stand by; when it goes away the broker hands the queue, unacked messages
first and in order, to the next. The active gateway pipelines deliveries across devices
but publishes one device's messages one after the other (QoS 1, waiting for the
broker's PUBACK) and acks each AMQP delivery after its PUBACK, so every device sees its
messages in the order they were published. (A takeover may repeat the last few messages
of a device; envelopes carry ids and receivers de-duplicate.)

Why single-active-consumer and not a consistent-hash exchange: it needs no broker plugin,
keeps the order exactly through a failover, and one gateway forwards tens of thousands of
small messages a second, far above what the back end produces.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import paho.mqtt.client as mqtt
import structlog

import orchestrator.messages  # noqa: F401 - registers the app.event.* types phones send
import workers.tsm.messages  # noqa: F401 - registers the se.result.* types phones send
from infra import metrics
from infra.bus import (
    DEVICE_ROUTING_PREFIX,
    GATEWAY_BINDINGS,
    GATEWAY_QUEUE,
    GATEWAY_UP_QUEUE,
    RetryBackoff,
    check_from_phone,
)
from infra.heap import freeze_start_up_objects
from infra.mqtt import (
    GATEWAY_SHARE_GROUP,
    TOPIC_ROOT,
    MqttSession,
    device_of,
    down_topic,
    shared_up_topics,
)
from infra.transport.base import Delivery, Outgoing, Subscription, Transport, Unroutable
from infra.transport.ordering import PerKeyOrder
from protocol.envelope import decode
from protocol.errors import JpkiError

log = structlog.get_logger(__name__)

UP_QUEUE = GATEWAY_UP_QUEUE
TOPIC_HEADER = "mqtt-topic"


@dataclass
class GatewayStats:
    up: int = 0
    down: int = 0
    parked: int = 0
    devices_down: set[str] = field(default_factory=set)


class Gateway:
    def __init__(
        self,
        transport: Transport,
        mqtt_url: str,
        *,
        name: str | None = None,
        topic_root: str = TOPIC_ROOT,
        share_group: str = GATEWAY_SHARE_GROUP,
        down_queue: str = GATEWAY_QUEUE,
        up_queue: str = UP_QUEUE,
        prefetch: int = 256,
        max_inflight: int = 100,
        backoff: RetryBackoff | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.stats = GatewayStats()
        self._transport = transport
        self._root = topic_root
        self.down_queue = down_queue
        self.up_queue = up_queue
        self._prefetch = prefetch
        self._backoff = backoff or RetryBackoff(base=0.1, cap=5.0)
        self._rng = rng or random.Random()
        self._order_down = PerKeyOrder()
        # up messages waiting for the next batch: what to publish, its MQTT topic, and the
        # future that completes (and lets the MQTT message be acked) once it is confirmed
        self._up_waiting: list[tuple[Outgoing, str, asyncio.Future[None]]] = []
        self._up_publisher: asyncio.Task[None] | None = None
        self._subscriptions: list[Subscription] = []
        self._mqtt = MqttSession(
            mqtt_url,
            identifier=f"jpki-gateway-{self.name}",
            subscriptions=[shared_up_topics(topic_root, share_group)],
            on_message=self._from_phone,
            pipelined=True,
            max_inflight=max_inflight,
            backoff=self._backoff,
            rng=self._rng,
        )

    async def declare(self) -> None:
        await self._transport.declare_queue(
            self.down_queue, GATEWAY_BINDINGS, single_active_consumer=True
        )
        await self._transport.declare_queue(self.up_queue, [])

    async def start(self) -> None:
        await self.declare()
        await self._mqtt.start()
        self._subscriptions = [
            await self._transport.consume(self.down_queue, self._to_phone, prefetch=self._prefetch),
            await self._transport.consume(self.up_queue, self._replayed, prefetch=16),
        ]
        log.info("gateway.started", gateway=self.name)

    async def stop(self, *, forget: bool = False, retire: bool = False) -> None:
        """Stop; ``forget`` also ends the MQTT session at once. ``retire`` leaves for
        good without losing a message: the gateway unsubscribes, forwards and acks what
        it holds, then ends its session, which would otherwise stay in the shared group
        and take its share of the phones' messages with nobody to read them."""
        for subscription in self._subscriptions:
            await subscription.cancel()
        self._subscriptions = []
        if retire:
            await self._mqtt.retire()
        else:
            await self._mqtt.close(forget=forget)
        if self._up_publisher is not None:  # a retire that drained left nothing to it
            self._up_publisher.cancel()
            await asyncio.gather(self._up_publisher, return_exceptions=True)
        log.info("gateway.stopped", gateway=self.name)

    # --- up: phone -> AMQP -------------------------------------------------------------

    def _from_phone(self, message: mqtt.MQTTMessage) -> asyncio.Future[None]:
        return self._forward_up(message.topic, message.payload)

    def _forward_up(self, topic: str, raw: bytes) -> asyncio.Future[None]:
        """Check a phone's message and queue it for the next batch; the future completes
        once RabbitMQ confirmed it (or it was parked)."""
        try:
            device_id = device_of(topic, self._root)
            message = check_from_phone(decode(raw), device_id)
        except JpkiError as exc:  # InvalidMessage, ForeignMessage, InvalidDeviceId
            return asyncio.ensure_future(self._park_up(topic, raw, f"{type(exc).__name__}: {exc}"))
        envelope = message.envelope
        published: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._up_waiting.append((Outgoing(envelope.type, raw, envelope.message_id), topic,
                                 published))
        if self._up_publisher is None:
            self._up_publisher = asyncio.create_task(self._publish_up())
        return published

    async def _publish_up(self) -> None:
        batch: list[tuple[Outgoing, str, asyncio.Future[None]]] = []
        try:
            while self._up_waiting:
                batch, self._up_waiting = self._up_waiting, []
                await self._publish_batch(batch)
                for _, _, published in batch:
                    if not published.done():  # a closed MQTT session gave up on it
                        published.set_result(None)
                batch = []
        finally:
            self._up_publisher = None
            for _, _, published in batch + self._up_waiting:
                published.cancel()  # unacked on MQTT: the broker hands it over again
            self._up_waiting = []

    async def _publish_batch(self, batch: list[tuple[Outgoing, str, asyncio.Future[None]]]) -> None:
        outgoing = [item[0] for item in batch]
        try:
            await self._retrying(lambda: self._transport.publish(outgoing))
        except Unroutable:
            # which message has no queue is not told: publish them one by one (those
            # already confirmed go twice; receivers de-duplicate by message id)
            for one, topic, _ in batch:
                try:
                    await self._retrying(lambda one=one: self._transport.publish([one]))
                except Unroutable as exc:
                    await self._park_up(topic, one.body, f"Unroutable: {exc}")
                    outgoing.remove(one)
        self.stats.up += len(outgoing)
        metrics.GATEWAY_FORWARDED.labels("up").inc(len(outgoing))

    async def _park_up(self, topic: str, raw: bytes, reason: str) -> None:
        log.warning("gateway.up_refused", topic=topic, reason=reason)
        parked = Outgoing(self.up_queue, raw, _message_id_of(raw), headers={TOPIC_HEADER: topic})
        await self._retrying(lambda: self._transport.park(self.up_queue, parked, reason))
        self.stats.parked += 1
        metrics.PARKED.labels(self.up_queue, "invalid").inc()

    async def _retrying(self, operation: Callable[[], Awaitable[None]]) -> None:
        """Keep trying while the broker is away: the phone's message waits unacked."""
        attempt = 0
        while True:
            try:
                await operation()
                return
            except Unroutable:
                raise
            except JpkiError as exc:
                attempt += 1
                delay = self._backoff.delay(attempt, self._rng)
                log.warning("gateway.amqp_retry", error=type(exc).__name__, retry_in=delay)
                await asyncio.sleep(delay)

    async def _replayed(self, delivery: Delivery) -> None:
        topic = delivery.headers.get(TOPIC_HEADER, delivery.routing_key)
        await self._forward_up(topic, delivery.body)
        await delivery.ack()

    # --- down: AMQP -> phone -----------------------------------------------------------

    async def _to_phone(self, delivery: Delivery) -> None:
        device_id = delivery.routing_key.removeprefix(DEVICE_ROUTING_PREFIX)
        try:
            topic = down_topic(device_id, self._root)
        except JpkiError as exc:
            await delivery.park(f"{type(exc).__name__}: {exc}")
            return
        async with self._order_down.turn(device_id):
            await self._mqtt.publish(topic, delivery.body)
            await delivery.ack()
        self.stats.down += 1
        self.stats.devices_down.add(device_id)
        metrics.GATEWAY_FORWARDED.labels("down").inc()


class _IdOnly(msgspec.Struct):
    message_id: str = ""


_id_decoder = msgspec.json.Decoder(_IdOnly)


def _message_id_of(raw: bytes) -> str:
    """The envelope's message id if one can be read, for operators listing the lot."""
    try:
        return _id_decoder.decode(raw).message_id
    except msgspec.DecodeError:
        return ""


async def run_gateway(
    transport: Transport,
    mqtt_url: str,
    *,
    name: str | None = None,
    topic_root: str = TOPIC_ROOT,
    stop: asyncio.Event | None = None,
) -> None:
    """Run a gateway until ``stop`` is set (or forever), then retire it: a stopped
    gateway leaves the shared subscription to the others (one that crashes keeps its
    session, and its unacknowledged messages, until it returns under the same name)."""
    gateway = Gateway(transport, mqtt_url, name=name, topic_root=topic_root)
    await gateway.start()
    freeze_start_up_objects()
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await gateway.stop(retire=True)
