"""The typed bus every service uses on top of a transport.

Publishing: the routing key of a message is its envelope type (``tsm.cmd.install``), or
``device.<device_id>`` for a message to a phone (types under ``PHONE_BOUND_PREFIXES``),
which the gateway (or the in-process phone link) delivers on the device's down topic.

Consuming: every delivery is decoded with ``protocol.envelope.decode``. A message that
does not decode is parked with its reason (never crashes the consumer, never dropped).
A handler that raises a transient error gets its message retried with backoff until the
queue's delivery limit parks it; any other exception parks the message at once, with the
exception's type only (its text may carry data we must not copy into a queue). The
handler runs with structlog contextvars bound to the message's saga, device and type.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import structlog

from infra import metrics
from infra.transport.base import Delivery, Outgoing, Subscription, Transport
from protocol.envelope import InvalidMessage, Message, build, decode, encode
from protocol.errors import Disposition, JpkiError

log = structlog.get_logger(__name__)

# Commands from the back end to a phone's app or secure element travel on the device's
# own topic; everything else is routed by its type.
PHONE_BOUND_PREFIXES = ("app.cmd.", "se.cmd.")
# What a phone may send up: the app's events and its secure element's results. Anything
# else from a phone (a forged ``ca.cmd.issue``) is refused at the gateway.
PHONE_ORIGINATED_PREFIXES = ("app.event.", "se.result.")
DEVICE_ROUTING_PREFIX = "device."

# One AMQP word and one MQTT topic level: no ".", "/", "+", "#", "*".
_DEVICE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

# The service queues of the routing convention (queue name -> binding patterns).
SERVICE_QUEUES: Mapping[str, tuple[str, ...]] = {
    # callcentre.cmd.#: authenticated operator requests (orchestrator/callcentre.py)
    "orchestrator": ("*.reply.#", "app.event.#", "callcentre.cmd.#"),
    "tsm": ("tsm.cmd.#", "se.result.#"),
    "ca": ("ca.cmd.#",),
}
GATEWAY_QUEUE = "gateway.down"
GATEWAY_BINDINGS = (DEVICE_ROUTING_PREFIX + "#",)
GATEWAY_UP_QUEUE = "gateway.up"  # no bindings: holds replays of parked up messages


class InvalidDeviceId(JpkiError):
    """A device id that cannot be a routing-key word and a topic level."""


class ForeignMessage(InvalidMessage):
    """A phone sent a message a phone may not send, or one in another device's name."""


def check_from_phone(message: Message, device_id: str) -> Message:
    """Refuse what the phone on ``device_id``'s link has no business sending."""
    envelope = message.envelope
    if not envelope.type.startswith(PHONE_ORIGINATED_PREFIXES):
        raise ForeignMessage(f"a phone may not send {envelope.type}")
    if envelope.device_id != device_id:
        raise ForeignMessage("envelope device id does not match the link's device")
    return message


def check_device_id(device_id: str) -> str:
    if not _DEVICE_ID.fullmatch(device_id):
        raise InvalidDeviceId("device id must be 1-64 of A-Z a-z 0-9 _ -")
    return device_id


def device_routing_key(device_id: str) -> str:
    return DEVICE_ROUTING_PREFIX + check_device_id(device_id)


def routing_key_for(message: Message) -> str:
    envelope = message.envelope
    if envelope.type.startswith(PHONE_BOUND_PREFIXES):
        if envelope.device_id is None:
            raise InvalidDeviceId(f"{envelope.type} goes to a phone but names no device")
        return device_routing_key(envelope.device_id)
    return envelope.type


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: ours marked transient, timeouts, lost connections."""
    if isinstance(exc, JpkiError):
        return exc.disposition is Disposition.TRANSIENT
    return isinstance(exc, TimeoutError | ConnectionError)


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """One durable queue of the topology (its parking lot comes with it)."""

    name: str
    bindings: tuple[str, ...]
    single_active_consumer: bool = False


def service_topology(
    queues: Mapping[str, Sequence[str]] = SERVICE_QUEUES, *, gateway: bool = True
) -> list[QueueSpec]:
    """The queues ``declare_topology`` declares, in order.

    The gateway queue has a single active consumer: with several gateways one of them
    forwards to the phones while the others stand by, so a device's messages keep
    their order.
    """
    specs = [QueueSpec(queue, tuple(bindings)) for queue, bindings in queues.items()]
    if gateway:
        specs.append(QueueSpec(GATEWAY_QUEUE, GATEWAY_BINDINGS, single_active_consumer=True))
    return specs


def deployment_topology() -> list[QueueSpec]:
    """Every queue a deployment runs with: the service queues of the convention and the
    gateway's two queues (``gateway.up`` has no bindings; it holds replayed up messages)."""
    return [*service_topology(), QueueSpec(GATEWAY_UP_QUEUE, ())]


async def declare_topology(
    transport: Transport,
    queues: Mapping[str, Sequence[str]] = SERVICE_QUEUES,
    *,
    gateway: bool = True,
    delivery_limit: int | None = None,
) -> None:
    """Declare the service queues (and the gateway's device queue) of the convention."""
    for spec in service_topology(queues, gateway=gateway):
        await transport.declare_queue(
            spec.name,
            spec.bindings,
            delivery_limit=delivery_limit,
            single_active_consumer=spec.single_active_consumer,
        )


MessageHandler = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class RetryBackoff:
    """Exponential backoff with jitter before a transient failure is retried."""

    base: float = 0.05
    cap: float = 2.0

    def delay(self, delivery_count: int, rng: random.Random) -> float:
        ceiling = min(self.cap, self.base * 2 ** max(0, delivery_count - 1))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


class Bus:
    def __init__(
        self,
        transport: Transport,
        *,
        transient: Callable[[BaseException], bool] = is_transient,
        backoff: RetryBackoff | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.transport = transport
        self._transient = transient
        self._backoff = backoff or RetryBackoff()
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._counted: dict[
            tuple[str, str], tuple[Callable[[], None], Callable[[float], None]]
        ] = {}

    def _acked_meters(
        self, queue: str, message_type: str
    ) -> tuple[Callable[[], None], Callable[[float], None]]:
        """The labelled children of the hot-path metrics, looked up once per (queue, type)."""
        key = (queue, message_type)
        meters = self._counted.get(key)
        if meters is None:
            meters = self._counted[key] = (
                metrics.MESSAGES_IN.labels(queue, message_type, "ack").inc,
                metrics.HANDLER_SECONDS.labels(queue, message_type).observe,
            )
        return meters

    async def publish(self, *messages: Message, routing_key: str | None = None) -> None:
        """Publish and wait for the broker's confirms (``routing_key`` overrides the rule)."""
        outgoing = [
            Outgoing(
                routing_key=routing_key or routing_key_for(message),
                body=encode(message),
                message_id=message.envelope.message_id,
            )
            for message in messages
        ]
        await self.transport.publish(outgoing)
        for message in messages:
            metrics.MESSAGES_OUT.labels(message.envelope.type).inc()

    async def reply(
        self, request: Message, body: object, *, deadline: datetime | None = None
    ) -> Message:
        """Answer ``request``: same saga and device, caused by it, sent where it asked."""
        message = build(
            body,
            saga_id=request.envelope.saga_id,
            device_id=request.envelope.device_id,
            causation_id=request.envelope.message_id,
            deadline=deadline,
        )
        await self.publish(message, routing_key=request.envelope.reply_to)
        return message

    async def subscribe(
        self, queue: str, handler: MessageHandler, *, prefetch: int = 64
    ) -> Subscription:
        async def on_delivery(delivery: Delivery) -> None:
            await self._handle(queue, handler, delivery)

        return await self.transport.consume(queue, on_delivery, prefetch=prefetch)

    async def _handle(self, queue: str, handler: MessageHandler, delivery: Delivery) -> None:
        if delivery.redelivered:
            metrics.REDELIVERIES.labels(queue).inc()
        try:
            message = decode(delivery.body)
        except InvalidMessage as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.warning(
                "bus.invalid_message", queue=queue, message_id=delivery.message_id, reason=reason
            )
            await delivery.park(reason)
            metrics.MESSAGES_IN.labels(queue, "invalid", "park").inc()
            metrics.PARKED.labels(queue, "invalid").inc()
            return

        envelope = message.envelope
        with structlog.contextvars.bound_contextvars(
            saga_id=envelope.saga_id,
            device_id=envelope.device_id,
            message_type=envelope.type,
            message_id=envelope.message_id,
        ):
            count_ack, observe_seconds = self._acked_meters(queue, envelope.type)
            started = time.perf_counter()
            try:
                await handler(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await self._failed(queue, delivery, envelope.type, exc)
                return
            finally:
                observe_seconds(time.perf_counter() - started)
            await delivery.ack()
            count_ack()

    async def _failed(
        self, queue: str, delivery: Delivery, message_type: str, exc: Exception
    ) -> None:
        error = type(exc).__name__
        if self._transient(exc):
            delay = self._backoff.delay(delivery.delivery_count, self._rng)
            log.warning(
                "bus.handler_transient_error",
                queue=queue,
                error=error,
                delivery_count=delivery.delivery_count,
                retry_in=round(delay, 3),
            )
            await self._sleep(delay)
            await delivery.retry()
            metrics.MESSAGES_IN.labels(queue, message_type, "retry").inc()
            return
        disposition = exc.disposition if isinstance(exc, JpkiError) else "bug"
        reason = f"handler failed: {error} ({disposition})"
        log.error("bus.handler_failed", queue=queue, error=error, disposition=str(disposition))
        await delivery.park(reason)
        metrics.MESSAGES_IN.labels(queue, message_type, "park").inc()
        metrics.PARKED.labels(queue, "rejected").inc()
