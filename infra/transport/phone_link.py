"""A phone's link to the back end, and the in-process one of the embedded default.

A phone sends its app's events and its secure element's results up, and receives the
commands addressed to its device down, one at a time and in order. Over MQTT
(``infra.mqtt.MqttPhoneLink``) that is a topic pair per device bridged by the gateway;
in one process (``InProcessPhoneHub``) the hub stands where the gateway and the MQTT
broker would: it consumes the gateway queue (``device.#``) of the transport, holds a
device's messages while it is offline (as a persistent MQTT session would) and checks
what phones send exactly as the gateway does.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable

import structlog

from infra.bus import (
    DEVICE_ROUTING_PREFIX,
    GATEWAY_QUEUE,
    Bus,
    check_device_id,
    check_from_phone,
)
from infra.transport.base import Delivery, Subscription
from infra.transport.ordering import PerKeyOrder
from protocol.envelope import InvalidMessage, Message, decode

log = structlog.get_logger(__name__)

DownHandler = Callable[[Message], Awaitable[None]]


class PhoneLink(ABC):
    device_id: str

    @abstractmethod
    async def start(self, on_message: DownHandler) -> None:
        """Connect and deliver the device's down messages to ``on_message``, in order.

        A message that does not decode is logged and skipped: a phone has no parking
        lot, and the back end's step timeout notices the silence. A handler that raises
        is logged; the message counts as delivered (the app's own state decides).
        """

    @abstractmethod
    async def send(self, message: Message) -> None:
        """Send up; returns once the broker (or the transport) has it."""

    @abstractmethod
    async def close(self, *, forget: bool = False) -> None:
        """Disconnect; messages sent meanwhile wait for the phone, unless ``forget``."""


async def deliver_down(device_id: str, raw: bytes, on_message: DownHandler) -> None:
    """Decode one down message and hand it to the phone, never raising."""
    try:
        message = decode(raw)
    except InvalidMessage as exc:
        log.warning("phone.invalid_down_message", device_id=device_id, reason=str(exc))
        return
    try:
        await on_message(message)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.error(
            "phone.handler_failed",
            device_id=device_id,
            message_type=message.envelope.type,
            error=type(exc).__name__,
        )


class InProcessPhoneHub:
    """Phones attached directly to the in-process transport's ``device.#`` traffic."""

    def __init__(self, bus: Bus, *, prefetch: int = 256) -> None:
        self._bus = bus
        self._prefetch = prefetch
        self._handlers: dict[str, DownHandler] = {}
        self._waiting: defaultdict[str, deque[bytes]] = defaultdict(deque)
        self._order = PerKeyOrder()
        self._subscription: Subscription | None = None

    async def start(self) -> None:
        self._subscription = await self._bus.transport.consume(
            GATEWAY_QUEUE, self._on_delivery, prefetch=self._prefetch
        )

    async def close(self) -> None:
        if self._subscription is not None:
            await self._subscription.cancel()
            self._subscription = None

    def link(self, device_id: str) -> InProcessPhoneLink:
        return InProcessPhoneLink(self, check_device_id(device_id))

    def waiting(self, device_id: str) -> int:
        """Messages held for a device that is not attached."""
        return len(self._waiting.get(device_id, ()))

    async def _on_delivery(self, delivery: Delivery) -> None:
        device_id = delivery.routing_key.removeprefix(DEVICE_ROUTING_PREFIX)
        async with self._order.turn(device_id):
            handler = self._handlers.get(device_id)
            if handler is None:
                self._waiting[device_id].append(delivery.body)
            else:
                await deliver_down(device_id, delivery.body, handler)
            await delivery.ack()

    async def attach(self, device_id: str, on_message: DownHandler) -> None:
        held = self._waiting[device_id]
        while held:  # what arrives meanwhile joins ``held``, so the order holds
            await deliver_down(device_id, held.popleft(), on_message)
        self._handlers[device_id] = on_message
        del self._waiting[device_id]

    def detach(self, device_id: str, *, forget: bool = False) -> None:
        self._handlers.pop(device_id, None)
        if forget:
            self._waiting.pop(device_id, None)

    async def send_up(self, device_id: str, message: Message) -> None:
        await self._bus.publish(check_from_phone(message, device_id))


class InProcessPhoneLink(PhoneLink):
    def __init__(self, hub: InProcessPhoneHub, device_id: str) -> None:
        self._hub = hub
        self.device_id = device_id

    async def start(self, on_message: DownHandler) -> None:
        await self._hub.attach(self.device_id, on_message)

    async def send(self, message: Message) -> None:
        await self._hub.send_up(self.device_id, message)

    async def close(self, *, forget: bool = False) -> None:
        self._hub.detach(self.device_id, forget=forget)
