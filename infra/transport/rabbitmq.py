"""RabbitMQ transport (aio-pika): quorum queues, publisher confirms, parking lots.

Topology (declared idempotently, re-declared by the robust connection after a reconnect):
- a durable topic exchange (``jpki``) every message is published to, by routing key;
- a durable direct dead-letter exchange (``jpki.dlx``);
- per service queue ``q``: a quorum queue with an explicit ``x-delivery-limit`` that
  dead-letters into ``jpki.dlx`` with routing key ``q`` (at-least-once dead lettering,
  which needs ``overflow=reject-publish``), and its parking lot ``q.parking``, a quorum
  queue bound to ``jpki.dlx`` by ``q``.

Publishing uses its own channel in confirm mode with ``mandatory`` set: a batch is
written to the socket as one block of frames (one ``send`` instead of one per message)
with every message in flight at once, and returns when all are confirmed; a message no
queue is bound for comes back and raises ``Unroutable``. Each subscription
gets its own channel (its prefetch is the channel's QoS), so cancelling it closes the
channel and the broker returns what the consumer held, as it does when a process dies.
Subscriptions consume through aiormq directly (one task per delivery, no aio-pika message
object) and start their consumer again on the channel the robust connection reopens.

``park(reason)`` publishes the message to the dead-letter exchange with the reason in a
header, waits for the confirm, then acks the original: the reason survives and nothing is
lost in between (at worst the message is parked twice, with one id).

Settling is merged per subscription: every ack and nack asked for in one round of the
event loop is written at its end as one block, with one ``basic.ack`` (``multiple``) up to
the highest delivery tag below which nothing else is unsettled and single acks above it;
``ack_many`` (a committed batch) is one such block.
"""

from __future__ import annotations

import asyncio
import functools
import struct
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import commands as amqp

from infra.transport.base import (
    DEFAULT_DELIVERY_LIMIT,
    DELIVERY_LIMIT_REASON,
    Delivery,
    Handler,
    Outgoing,
    Parked,
    Subscription,
    TopologyMismatch,
    Transport,
    TransportError,
    Unroutable,
    handle_or_retry,
    parking_lot,
)

log = structlog.get_logger(__name__)

# Headers this transport owns; stripped before a parked message is replayed.
PARK_REASON = "x-park-reason"
PARKED_AT = "x-parked-at"
ORIGINAL_ROUTING_KEY = "x-original-routing-key"
_BROKER_HEADERS = (
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
)
_OWN_HEADERS = (PARK_REASON, PARKED_AT, ORIGINAL_ROUTING_KEY)

# Publishes a batch keeps in flight at once (each waits for its confirm).
_PUBLISH_WINDOW = 1000


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _user_headers(headers: Mapping[str, Any]) -> dict[str, str]:
    return {
        key: _text(value)
        for key, value in headers.items()
        if key not in _BROKER_HEADERS and key not in _OWN_HEADERS
    }


def _original_routing_key(headers: Mapping[str, Any], routing_key: str | None) -> str:
    if ORIGINAL_ROUTING_KEY in headers:
        return _text(headers[ORIGINAL_ROUTING_KEY])
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths:
        keys = deaths[-1].get("routing-keys") or []  # the oldest death: where it was first sent
        if keys:
            return _text(keys[0])
    return routing_key or ""


# How a settle request is written: ``None`` acks, ``True``/``False`` nacks with that requeue.
_ACK = None
_REQUEUE = True


class _RabbitDelivery(Delivery):
    """A delivery read straight from aiormq's frames (no aio-pika message object)."""

    def __init__(
        self,
        message: DeliveredMessage,
        queue: str,
        transport: RabbitMQTransport,
        subscription: _RabbitSubscription,
    ) -> None:
        deliver = message.delivery
        properties = message.header.properties
        headers = properties.headers or {}
        self.routing_key = _original_routing_key(headers, deliver.routing_key)
        self.body = message.body
        self.message_id = properties.message_id or ""
        self.headers = _user_headers(headers) if headers else {}
        self.redelivered = bool(deliver.redelivered)
        # quorum queues count earlier failed deliveries in x-delivery-count
        self.delivery_count = int(headers.get("x-delivery-count", 0) or 0) + 1
        self.raw_headers: Mapping[str, Any] = headers
        self.delivered_routing_key: str = deliver.routing_key or ""
        self._queue = queue
        self._transport = transport
        self._subscription = subscription
        self.settled = False
        # the AMQP channel it came on: delivery tags count per channel (a new one after a
        # reconnect), so an ack always goes to the channel that delivered
        self.channel: aiormq.abc.AbstractChannel = message.channel
        self.tag: int = deliver.delivery_tag or 0

    async def ack(self) -> None:
        self._settle(_ACK)

    async def retry(self) -> None:
        self._settle(_REQUEUE)

    async def park(self, reason: str) -> None:
        if self._subscription.active and not self.settled:
            await self._transport._park(self._queue, self, reason)
        self._settle(_ACK)

    def _settle(self, requeue: bool | None) -> None:
        if self.settled:
            return
        self.settled = True
        self._subscription.settle(self.channel, self.tag, requeue)


PARKING_LOT_ARGUMENTS: Mapping[str, Any] = {"x-queue-type": "quorum"}


def queue_arguments(
    queue: str,
    *,
    delivery_limit: int,
    dead_letter_exchange: str,
    single_active_consumer: bool = False,
) -> dict[str, Any]:
    """The arguments of a service queue (``declare_queue`` and the broker definitions)."""
    arguments: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": dead_letter_exchange,
        "x-dead-letter-routing-key": queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    if single_active_consumer:
        arguments["x-single-active-consumer"] = True
    return arguments


class _RabbitSubscription(Subscription):
    """A consumer on its own channel, driven by aiormq's deliveries directly.

    aio-pika's ``Queue.consume`` wraps every delivery in an ``IncomingMessage`` and runs
    the callback in a second task; here aiormq's one task per delivery runs the handler.
    The robust channel still reopens itself after a reconnect (restoring its QoS); the
    consumer is then started again on the new channel (``_resume``), as it is when the
    broker cancels it.

    Settling is merged: acks and nacks asked for while the event loop runs one round are
    written together at the end of it, as one block of frames (one ``send``), with a
    ``multiple`` ack up to the highest tag below which nothing else is unsettled.
    """

    def __init__(
        self,
        channel: AbstractRobustChannel,
        queue: str,
        handler: Handler,
        transport: RabbitMQTransport,
        reconnect_interval: float,
    ) -> None:
        self.channel = channel
        self.queue = queue
        self._handler = handler
        self._transport = transport
        self._reconnect_interval = reconnect_interval
        self.tasks: set[asyncio.Task[Any]] = set()
        self.active = True
        # delivery tags not yet settled, per AMQP channel (see ``_frames``)
        self.unsettled: dict[aiormq.abc.AbstractChannel, set[int]] = {}
        # settle requests not yet handed to the connection's writer, in request order
        self._requested: dict[aiormq.abc.AbstractChannel, list[tuple[int, bool | None]]] = {}
        self._flush_scheduled = False
        self._writing: asyncio.Future[None] | None = None  # a block waiting for the writer
        self._consumer_tag: str | None = None
        self._resuming: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consume_on(await self.channel.get_underlay_channel())
        self.channel.reopen_callbacks.add(self._reopened)

    async def _consume_on(self, underlay: aiormq.abc.AbstractChannel) -> None:
        # entries of channels that are gone would only grow: the broker requeued those
        self.unsettled = {c: t for c, t in self.unsettled.items() if not c.is_closed}
        underlay.on_consumer_cancel_callbacks.add(self._cancelled_by_broker)
        ok = await underlay.basic_consume(self.queue, self._on_message)
        self._consumer_tag = ok.consumer_tag

    def _reopened(self, _channel: Any) -> None:
        self._resume("reconnected")

    def _cancelled_by_broker(self, frame: amqp.Basic.Cancel) -> None:
        if frame.consumer_tag == self._consumer_tag:
            self._resume("cancelled by the broker")

    def _resume(self, why: str) -> None:
        """Consume again on the channel the robust connection reopened (in a task: the
        connection is ready only once every channel's reopen callbacks have returned)."""
        if not self.active or (self._resuming is not None and not self._resuming.done()):
            return
        log.info("transport.consumer_resuming", queue=self.queue, why=why)
        self._resuming = asyncio.get_running_loop().create_task(self._resume_until_consuming())

    async def _resume_until_consuming(self) -> None:
        while self.active:
            try:
                # consuming from a queue that is not there would close the channel: look
                # first, on a channel of its own (a queue deleted meanwhile comes back
                # here through the channel's reopening)
                if await self._transport.queue_exists(self.queue):
                    await self._consume_on(await self.channel.get_underlay_channel())
                    log.info("transport.consumer_resumed", queue=self.queue)
                    return
                log.warning("transport.consumer_waits_for_queue", queue=self.queue)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker is still away: try again
                log.warning("transport.consumer_resume_failed", queue=self.queue,
                            error=type(exc).__name__)
            await asyncio.sleep(self._reconnect_interval)

    async def _on_message(self, message: DeliveredMessage) -> None:
        if not self.active:
            # Delivered just before the cancel and not started yet: the channel's
            # close returns it to the queue. Handling it now could overtake
            # earlier messages the cancel interrupted (and that come back first).
            return
        delivery = _RabbitDelivery(message, self.queue, self._transport, self)
        self.unsettled.setdefault(delivery.channel, set()).add(delivery.tag)
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        try:
            await handle_or_retry(self._handler, delivery, self.queue)
        finally:
            if task is not None:
                self.tasks.discard(task)

    def settle(self, channel: aiormq.abc.AbstractChannel, tag: int, requeue: bool | None) -> None:
        if not self.active:
            # A cancelled subscription's channel is closing and the broker returns what it
            # held: settling on it now would race the close (and a frame on a closed
            # channel costs the whole connection), so leave it to the broker.
            self._forget(channel, {tag})
            return
        self._requested.setdefault(channel, []).append((tag, requeue))
        if not self._flush_scheduled and self._writing is None:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _forget(self, channel: aiormq.abc.AbstractChannel, tags: Iterable[int]) -> None:
        unsettled = self.unsettled.get(channel)
        if unsettled is not None:
            unsettled.difference_update(tags)
            if not unsettled:
                del self.unsettled[channel]

    def _flush(self) -> None:
        """Hand every requested settle to the connection's writer, one block per channel.

        Blocks are written strictly in the order they were made: a ``multiple`` ack that
        overtook an earlier single ack of a tag below it would make that one unknown to the
        broker, which closes the channel. So while a block waits for room in the writer's
        queue, later requests wait for it."""
        self._flush_scheduled = False
        while self._requested and self._writing is None:
            channel, requests = next(iter(self._requested.items()))
            del self._requested[channel]
            if channel.is_closed:
                # The channel is gone: the broker has already returned the messages.
                self._forget(channel, (tag for tag, _ in requests))
                log.info("transport.settle_on_closed_channel", settles=len(requests))
                continue
            block = ChannelFrame.marshall(
                channel_number=channel.number, frames=self._frames(channel, requests)
            )
            write_queue: asyncio.Queue[ChannelFrame] = channel.write_queue  # type: ignore[attr-defined]
            try:
                write_queue.put_nowait(block)
            except asyncio.QueueFull:
                self._writing = asyncio.ensure_future(write_queue.put(block))
                self._writing.add_done_callback(self._written)

    def _written(self, writing: asyncio.Future[None]) -> None:
        self._writing = None
        if not writing.cancelled() and writing.exception() is not None:
            log.info("transport.settle_not_written", error=type(writing.exception()).__name__)
        self._flush()

    def _frames(
        self, channel: aiormq.abc.AbstractChannel, requests: list[tuple[int, bool | None]]
    ) -> list[Any]:
        # nacks first: a ``multiple`` ack after them no longer covers their tags
        frames: list[Any] = [
            amqp.Basic.Nack(delivery_tag=tag, multiple=False, requeue=requeue)
            for tag, requeue in requests
            if requeue is not None
        ]
        acking = [tag for tag, requeue in requests if requeue is None]
        self._forget(channel, (tag for tag, _ in requests))
        # ``multiple`` acks every unsettled tag up to it: stop below the first tag that
        # is not settled yet (its handler still has it)
        first_other = min(self.unsettled.get(channel, ()), default=None)
        below = [tag for tag in acking if first_other is None or tag < first_other]
        if below:
            frames.append(amqp.Basic.Ack(delivery_tag=max(below), multiple=True))
        frames.extend(
            amqp.Basic.Ack(delivery_tag=tag, multiple=False)
            for tag in sorted(acking)
            if first_other is not None and tag > first_other
        )
        return frames

    async def cancel(self) -> None:
        if not self.active:
            return
        # settles already asked for go out before the channel's close
        while self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)
        self._flush()
        self.active = False
        if self._resuming is not None:
            self._resuming.cancel()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Closing the channel returns every unacked delivery to the queue.
        await self.channel.close()


class RabbitMQTransport(Transport):
    def __init__(
        self,
        url: str,
        *,
        exchange: str = "jpki",
        dead_letter_exchange: str = "jpki.dlx",
        default_delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
        connection_name: str = "jpki",
        reconnect_interval: float = 1.0,
    ) -> None:
        self._url = url
        self._reconnect_interval = reconnect_interval
        self._exchange_name = exchange
        self._dlx_name = dead_letter_exchange
        self._default_delivery_limit = default_delivery_limit
        self._connection_name = connection_name
        self._connection: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._dlx: AbstractExchange | None = None
        self._default_exchange: AbstractExchange | None = None
        self._declared: dict[str, tuple[str, ...]] = {}
        self._subscriptions: set[_RabbitSubscription] = set()

    def __repr__(self) -> str:
        # the URL may carry a password: never in a repr
        return f"RabbitMQTransport(exchange={self._exchange_name!r})"

    async def connect(self) -> None:
        try:
            self._connection = await aio_pika.connect_robust(
                self._url,
                client_properties={"connection_name": self._connection_name},
                reconnect_interval=self._reconnect_interval,
            )
        except (OSError, aiormq.exceptions.AMQPError) as exc:
            raise TransportError(f"cannot connect to RabbitMQ: {type(exc).__name__}") from None
        self._publish_channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        self._exchange = await self._publish_channel.declare_exchange(
            self._exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        self._dlx = await self._publish_channel.declare_exchange(
            self._dlx_name, aio_pika.ExchangeType.DIRECT, durable=True
        )
        self._default_exchange = self._publish_channel.default_exchange

    async def close(self) -> None:
        for subscription in list(self._subscriptions):
            await subscription.cancel()
        self._subscriptions.clear()
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    def _conn(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise TransportError("RabbitMQ transport is not connected")
        return self._connection

    async def declare_queue(
        self,
        queue: str,
        binding_keys: Sequence[str],
        *,
        delivery_limit: int | None = None,
        single_active_consumer: bool = False,
    ) -> None:
        limit = self._default_delivery_limit if delivery_limit is None else delivery_limit
        arguments = queue_arguments(
            queue,
            delivery_limit=limit,
            dead_letter_exchange=self._dlx_name,
            single_active_consumer=single_active_consumer,
        )
        async with self._conn().channel() as channel:
            try:
                declared = await channel.declare_queue(queue, durable=True, arguments=arguments)
            except aiormq.exceptions.ChannelPreconditionFailed:
                raise TopologyMismatch(
                    f"queue {queue!r} already declared with other arguments"
                ) from None
            for key in binding_keys:
                await declared.bind(self._exchange_name, routing_key=key)
            parking = await channel.declare_queue(
                parking_lot(queue), durable=True, arguments=dict(PARKING_LOT_ARGUMENTS)
            )
            await parking.bind(self._dlx_name, routing_key=queue)
        known = self._declared.get(queue, ())
        self._declared[queue] = known + tuple(k for k in binding_keys if k not in known)

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        channel = self._publish_channel
        if channel is None or self._exchange is None:
            raise TransportError("RabbitMQ transport is not connected")
        for start in range(0, len(messages), _PUBLISH_WINDOW):
            window = messages[start : start + _PUBLISH_WINDOW]
            try:
                underlay = await channel.get_underlay_channel()
                confirmations = await _write_publishes(underlay, self._exchange_name, window)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise TransportError(f"publish not written: {type(exc).__name__}") from None
            results = await asyncio.gather(*confirmations, return_exceptions=True)
            for outgoing, result in zip(window, results, strict=True):
                if isinstance(result, BaseException):
                    raise self._publish_error(outgoing, result) from None

    @staticmethod
    def _amqp_message(
        outgoing: Outgoing, headers: Mapping[str, Any] | None = None
    ) -> aio_pika.Message:
        return aio_pika.Message(
            outgoing.body,
            message_id=outgoing.message_id,
            headers=dict(headers if headers is not None else outgoing.headers),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )

    @staticmethod
    def _publish_error(outgoing: Outgoing, exc: BaseException) -> Exception:
        if isinstance(exc, aiormq.exceptions.PublishError):
            return Unroutable(f"no queue is bound for routing key {outgoing.routing_key!r}")
        if isinstance(exc, asyncio.CancelledError):
            return TransportError("publish cancelled before its confirm")
        return TransportError(f"publish not confirmed: {type(exc).__name__}")

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 64) -> Subscription:
        if not await self.queue_exists(queue):
            raise TransportError(f"no queue named {queue!r}")
        channel = await self._conn().channel()
        await channel.set_qos(prefetch_count=max(1, prefetch))
        subscription = _RabbitSubscription(
            channel, queue, handler, self, reconnect_interval=self._reconnect_interval
        )
        await subscription.start()
        self._subscriptions.add(subscription)
        return subscription

    async def queue_exists(self, queue: str) -> bool:
        async with self._conn().channel() as channel:
            try:
                await channel.declare_queue(queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return False
        return True

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            if not isinstance(delivery, _RabbitDelivery):
                raise TypeError(f"not a RabbitMQ delivery: {type(delivery).__name__}")
        # settles asked for in one go leave in one block (``_RabbitSubscription._flush``)
        for delivery in deliveries:
            await delivery.ack()

    async def _park(self, queue: str, delivery: _RabbitDelivery, reason: str) -> None:
        headers = dict(delivery.raw_headers)
        headers.setdefault(ORIGINAL_ROUTING_KEY, delivery.delivered_routing_key)
        await self._publish_parked(
            queue, Outgoing(queue, delivery.body, delivery.message_id), headers, reason
        )

    async def park(self, queue: str, message: Outgoing, reason: str) -> None:
        headers: dict[str, Any] = {**message.headers, ORIGINAL_ROUTING_KEY: message.routing_key}
        await self._publish_parked(queue, message, headers, reason)

    async def _publish_parked(
        self, queue: str, message: Outgoing, headers: dict[str, Any], reason: str
    ) -> None:
        dlx = self._dlx
        if dlx is None:
            raise TransportError("RabbitMQ transport is not connected")
        headers[PARK_REASON] = reason
        headers[PARKED_AT] = repr(time.time())
        try:
            await dlx.publish(self._amqp_message(message, headers), queue, mandatory=True)
        except Exception as exc:
            raise self._publish_error(message, exc) from None
        log.info("transport.parked", queue=queue, message_id=message.message_id, reason=reason)

    async def parked(self, queue: str, limit: int = 100) -> list[Parked]:
        found: list[Parked] = []
        # Messages taken with basic.get stay unacked and return to the parking lot when
        # the channel closes: listing never consumes.
        async with self._conn().channel() as channel:
            try:
                lot = await channel.get_queue(parking_lot(queue), ensure=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise TransportError(f"no parking lot for queue {queue!r}") from None
            while len(found) < limit:
                message = await lot.get(no_ack=False, fail=False)
                if message is None:
                    break
                found.append(self._parked(queue, message))
        await self._until_ready(parking_lot(queue), len(found))
        return found

    async def _until_ready(self, queue: str, count: int, within: float = 5.0) -> None:
        """Wait until ``queue`` shows ``count`` ready messages again.

        Messages a closed channel held return to a quorum queue asynchronously; waiting
        for them keeps list-then-replay (or two listings) consistent for the operator.
        """
        deadline = time.monotonic() + within
        async with self._conn().channel() as channel:
            while time.monotonic() < deadline:
                declared = await channel.declare_queue(queue, passive=True)
                if (declared.declaration_result.message_count or 0) >= count:
                    return
                await asyncio.sleep(0.02)
        log.warning("transport.returns_not_visible", queue=queue, expected=count)

    @staticmethod
    def _parked(queue: str, message: AbstractIncomingMessage) -> Parked:
        headers = message.headers or {}
        reason = _text(headers.get(PARK_REASON, ""))
        parked_at = float(_text(headers.get(PARKED_AT, "0")) or 0)
        if not reason:
            deaths = headers.get("x-death")
            death = deaths[0] if isinstance(deaths, list) and deaths else {}
            broker_reason = _text(death.get("reason", "unknown"))
            reason = DELIVERY_LIMIT_REASON if broker_reason == "delivery_limit" else broker_reason
            when = death.get("time")
            parked_at = when.timestamp() if hasattr(when, "timestamp") else time.time()
        return Parked(
            queue=queue,
            message_id=message.message_id or "",
            routing_key=_original_routing_key(headers, message.routing_key),
            body=message.body,
            reason=reason,
            parked_at=parked_at,
            headers=_user_headers(headers),
        )

    async def replay_parked(self, queue: str, message_ids: Sequence[str] | None = None) -> int:
        wanted = None if message_ids is None else set(message_ids)
        moved = 0
        async with self._conn().channel(publisher_confirms=True, on_return_raises=True) as channel:
            try:
                lot = await channel.declare_queue(parking_lot(queue), passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise TransportError(f"no parking lot for queue {queue!r}") from None
            pending = lot.declaration_result.message_count or 0
            for _ in range(pending):
                message = await lot.get(no_ack=False, fail=False)
                if message is None:
                    break
                if wanted is not None and (message.message_id or "") not in wanted:
                    continue  # stays unacked, returns to the lot when the channel closes
                replay = Outgoing(
                    queue,
                    message.body,
                    message.message_id or "",
                    headers={
                        **_user_headers(message.headers or {}),
                        ORIGINAL_ROUTING_KEY: _original_routing_key(
                            message.headers or {}, message.routing_key
                        ),
                    },
                )
                # The default exchange delivers to exactly this queue, not to every
                # queue bound for the original routing key.
                await channel.default_exchange.publish(
                    self._amqp_message(replay), queue, mandatory=True
                )
                await message.ack()
                moved += 1
        await self._until_ready(parking_lot(queue), pending - moved)
        return moved

    async def queue_depths(self) -> dict[str, int]:
        return await self.depths_of(self._declared)

    async def depths_of(self, queues: Iterable[str]) -> dict[str, int]:
        """Ready messages of the named queues and of their parking lots (operators)."""
        depths: dict[str, int] = {}
        async with self._conn().channel() as channel:
            for queue in queues:
                for name in (queue, parking_lot(queue)):
                    try:
                        declared = await channel.declare_queue(name, passive=True)
                    except aiormq.exceptions.ChannelNotFoundEntity:
                        raise TransportError(f"no queue named {name!r}") from None
                    depths[name] = declared.declaration_result.message_count or 0
        return depths

    async def delete_topology(self) -> None:
        """Delete the queues and exchanges this transport declared (tests, teardown)."""
        async with self._conn().channel() as channel:
            for queue in self._declared:
                await channel.queue_delete(queue)
                await channel.queue_delete(parking_lot(queue))
            await channel.exchange_delete(self._exchange_name)
            await channel.exchange_delete(self._dlx_name)
        self._declared.clear()


def _forget_message_id(
    channel: aiormq.abc.AbstractChannel, message_id: str, tag: int, _: asyncio.Future[Any]
) -> None:
    if channel.message_id_delivery_tag.get(message_id) == tag:  # type: ignore[attr-defined]
        del channel.message_id_delivery_tag[message_id]  # type: ignore[attr-defined]


# AMQP 0-9-1 wire format (spec §2.3.5, §4.2.6) of what ``_write_publishes`` sends:
# basic.publish (class 60, method 40, reserved short 0, exchange, routing key, mandatory
# bit), a content header (class 60, weight 0, body size, property flags and the set
# properties in flag order) and body frames. pamqp builds and marshals an object per
# frame, half the CPU of a publish; these are the same bytes (a test compares them).
_FRAME_END = b"\xce"
_METHOD_FRAME, _HEADER_FRAME, _BODY_FRAME = 1, 2, 3
_PUBLISH_HEAD = struct.pack(">HHH", 60, 40, 0)
_MANDATORY = b"\x01"
_CONTENT_HEAD = struct.pack(">HH", 60, 0)
# content-type, headers, delivery-mode, message-id (AMQP 0-9-1 §4.2.6.1: bit 15 first)
_PROPERTY_FLAGS = struct.pack(">H", 0x8000 | 0x2000 | 0x1000 | 0x0080)
_JSON = b"\x10application/json"
_PERSISTENT = b"\x02"


def _shortstr(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 255:
        raise ValueError("an AMQP short string holds at most 255 bytes")
    return bytes((len(raw),)) + raw


def _frame(kind: int, channel_number: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, channel_number, len(payload)) + payload + _FRAME_END


def _string_table(headers: Mapping[str, str]) -> bytes:
    entries = b"".join(
        _shortstr(name) + b"S" + struct.pack(">I", len(raw)) + raw
        for name, raw in ((name, value.encode()) for name, value in sorted(headers.items()))
    )
    return struct.pack(">I", len(entries)) + entries


def encoded_publish(
    channel_number: int, exchange: str, message: Outgoing, message_id: str, max_content: int
) -> bytes:
    """The frames of one persistent, mandatory JSON publish, ready for the socket."""
    method = _PUBLISH_HEAD + _shortstr(exchange) + _shortstr(message.routing_key) + _MANDATORY
    body = message.body
    header = (_CONTENT_HEAD + struct.pack(">Q", len(body)) + _PROPERTY_FLAGS + _JSON
              + _string_table(message.headers) + _PERSISTENT + _shortstr(message_id))
    frames = [_frame(_METHOD_FRAME, channel_number, method),
              _frame(_HEADER_FRAME, channel_number, header)]
    frames.extend(_frame(_BODY_FRAME, channel_number, body[start:start + max_content])
                  for start in range(0, len(body), max_content))
    return b"".join(frames)


async def _write_publishes(
    channel: aiormq.abc.AbstractChannel, exchange: str, messages: Sequence[Outgoing]
) -> list[asyncio.Future[Any]]:
    """Write ``messages`` as one block of frames; returns their confirmation futures.

    aiormq's ``basic_publish`` writes (and waits for the socket to drain) once per
    message: one ``send`` system call each, which costs more CPU than anything else on
    the publishing path. This keeps aiormq's own bookkeeping (delivery tag, confirmation
    future, message id for a ``basic.return``) exactly as ``basic_publish`` does, under
    the channel's lock, and hands the frames to the connection's writer at once.
    """
    state: Any = channel  # aiormq.Channel's bookkeeping is not on its abstract interface
    # a basic.return names the message by its id: it must be there and unique
    message_ids = [message.message_id or uuid.uuid4().hex for message in messages]
    payload = b"".join(
        encoded_publish(state.number, exchange, message, message_id, state.max_content_size)
        for message, message_id in zip(messages, message_ids, strict=True)
    )
    confirmations: list[asyncio.Future[Any]] = []
    registered: list[tuple[int, str]] = []
    async with state.lock:
        first_tag = state.delivery_tag
        for message_id in message_ids:
            state.delivery_tag += 1
            tag = state.delivery_tag
            confirmation = state.create_future()
            state.confirmations[tag] = confirmation
            state.message_id_delivery_tag[message_id] = tag
            registered.append((tag, message_id))
            confirmations.append(confirmation)
        drain = state.create_future()
        try:
            await state.write_queue.put(
                ChannelFrame(payload=payload, should_close=False, drain_future=drain)
            )
        except BaseException:
            # nothing reached the writer: give the tags back, as basic_publish does
            state.delivery_tag = first_tag
            for (tag, message_id), confirmation in zip(registered, confirmations, strict=True):
                state.confirmations.pop(tag, None)
                if state.message_id_delivery_tag.get(message_id) == tag:
                    del state.message_id_delivery_tag[message_id]
                confirmation.cancel()
            drain.cancel()
            raise
        for (tag, message_id), confirmation in zip(registered, confirmations, strict=True):
            confirmation.add_done_callback(
                functools.partial(_forget_message_id, channel, message_id, tag)
            )
        await drain
    return confirmations
