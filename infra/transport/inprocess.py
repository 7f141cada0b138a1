"""The embedded default transport: RabbitMQ's semantics in one process, no broker.

What it mirrors (so code tested here behaves the same on RabbitMQ's quorum queues):
one topic exchange with ``*``/``#`` binding patterns; per-consumer prefetch; ack, retry
(requeued at the head, ``redelivered`` set, the delivery count grows) and park; a
message that fails more than the queue's delivery limit goes to the queue's parking lot;
a cancelled consumer's unsettled deliveries are returned (and count as failures, as a
quorum queue counts them); single-active-consumer queues; parked messages are listed
and replayed. Nothing is durable across the process: that is what the SQLite outbox is
for in the embedded mode.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

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

_ROUTE_CACHE_SIZE = 65_536


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP 0-9-1 topic matching: ``*`` is exactly one word, ``#`` zero or more."""
    return _match(tuple(pattern.split(".")), tuple(routing_key.split(".")))


def _match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[skip:]) for skip in range(len(words) + 1))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _match(rest, words[1:])


@dataclass(slots=True)
class _Message:
    routing_key: str
    body: bytes
    message_id: str
    headers: dict[str, str]
    failures: int = 0
    redelivered: bool = False


class _InProcessDelivery(Delivery):
    __slots__ = (
        "routing_key",
        "body",
        "message_id",
        "headers",
        "redelivered",
        "delivery_count",
        "_message",
        "_consumer",
        "_settled",
    )

    def __init__(self, message: _Message, consumer: _Consumer) -> None:
        self.routing_key = message.routing_key
        self.body = message.body
        self.message_id = message.message_id
        self.headers = message.headers
        self.redelivered = message.redelivered
        self.delivery_count = message.failures + 1
        self._message = message
        self._consumer = consumer
        self._settled = False

    def _settle(self) -> bool:
        """Mark settled; False when already settled or returned with a cancelled consumer."""
        if self._settled:
            return False
        self._settled = True
        return self._consumer.release(self)

    async def ack(self) -> None:
        self._settle()

    async def retry(self) -> None:
        if self._settle():
            self._consumer.queue.fail(self._message)

    async def park(self, reason: str) -> None:
        if self._settle():
            self._consumer.queue.park(self._message, reason)


class _Consumer(Subscription):
    def __init__(
        self,
        queue: _Queue,
        handler: Handler,
        prefetch: int,
        forget: Callable[[_Consumer], None],
    ) -> None:
        self.queue = queue
        self._forget = forget
        self.handler = handler
        self.prefetch = max(1, prefetch)
        self.unsettled: set[_InProcessDelivery] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.active = True

    @property
    def has_capacity(self) -> bool:
        return self.active and len(self.unsettled) < self.prefetch

    def deliver(self, message: _Message) -> None:
        delivery = _InProcessDelivery(message, self)
        self.unsettled.add(delivery)
        task = asyncio.get_running_loop().create_task(
            handle_or_retry(self.handler, delivery, self.queue.name)
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def release(self, delivery: _InProcessDelivery) -> bool:
        if delivery not in self.unsettled:
            return False
        self.unsettled.discard(delivery)
        self.queue.dispatch()
        return True

    async def cancel(self) -> None:
        if not self.active:
            return
        self.active = False
        self._forget(self)
        self.queue.remove_consumer(self)
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # A consumer that goes away returns what it held, like a closed AMQP channel.
        returned = list(self.unsettled)
        self.unsettled.clear()
        for delivery in reversed(returned):
            delivery._settled = True
            self.queue.fail(delivery._message)


@dataclass(slots=True)
class _Queue:
    name: str
    delivery_limit: int
    single_active_consumer: bool
    clock: Callable[[], float]
    ready: deque[_Message] = field(default_factory=deque)
    parked: list[Parked] = field(default_factory=list)
    consumers: list[_Consumer] = field(default_factory=list)
    turn: int = 0

    def enqueue(self, message: _Message) -> None:
        self.ready.append(message)
        self.dispatch()

    def fail(self, message: _Message) -> None:
        message.failures += 1
        if message.failures > self.delivery_limit:
            self.park(message, DELIVERY_LIMIT_REASON)
            return
        message.redelivered = True
        self.ready.appendleft(message)
        self.dispatch()

    def park(self, message: _Message, reason: str) -> None:
        self.parked.append(
            Parked(
                queue=self.name,
                message_id=message.message_id,
                routing_key=message.routing_key,
                body=message.body,
                reason=reason,
                parked_at=self.clock(),
                headers=message.headers,
            )
        )
        log.info("transport.parked", queue=self.name, message_id=message.message_id, reason=reason)

    def remove_consumer(self, consumer: _Consumer) -> None:
        self.consumers.remove(consumer)
        self.dispatch()

    def dispatch(self) -> None:
        consumers = self.consumers[:1] if self.single_active_consumer else self.consumers
        while self.ready and consumers:
            count = len(consumers)
            for offset in range(count):
                consumer = consumers[(self.turn + offset) % count]
                if consumer.has_capacity:
                    self.turn = (self.turn + offset + 1) % count
                    consumer.deliver(self.ready.popleft())
                    break
            else:
                return


class InProcessTransport(Transport):
    def __init__(
        self,
        *,
        default_delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._default_delivery_limit = default_delivery_limit
        self._clock = clock
        self._queues: dict[str, _Queue] = {}
        self._bindings: list[tuple[str, _Queue]] = []
        self._routes: dict[str, tuple[_Queue, ...]] = {}
        self._consumers: set[_Consumer] = set()
        self._connected = False

    async def connect(self) -> None:
        self._connected = True

    async def close(self) -> None:
        for consumer in list(self._consumers):
            await consumer.cancel()
        self._consumers.clear()
        self._connected = False

    async def declare_queue(
        self,
        queue: str,
        binding_keys: Sequence[str],
        *,
        delivery_limit: int | None = None,
        single_active_consumer: bool = False,
    ) -> None:
        limit = self._default_delivery_limit if delivery_limit is None else delivery_limit
        existing = self._queues.get(queue)
        if existing is None:
            existing = self._queues[queue] = _Queue(
                queue, limit, single_active_consumer, self._clock
            )
        elif (existing.delivery_limit, existing.single_active_consumer) != (
            limit,
            single_active_consumer,
        ):
            # RabbitMQ refuses an inequivalent re-declaration (PRECONDITION_FAILED): so do we.
            raise TopologyMismatch(f"queue {queue!r} already declared with other arguments")
        for key in binding_keys:
            if (key, existing) not in self._bindings:
                self._bindings.append((key, existing))
        self._routes.clear()

    def _route(self, routing_key: str) -> tuple[_Queue, ...]:
        queues = self._routes.get(routing_key)
        if queues is None:
            matched = {id(q): q for key, q in self._bindings if topic_matches(key, routing_key)}
            queues = tuple(matched.values())
            if len(self._routes) >= _ROUTE_CACHE_SIZE:
                self._routes.clear()
            self._routes[routing_key] = queues
        return queues

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        if not self._connected:
            raise TransportError("in-process transport is not connected")
        routed = [(outgoing, self._route(outgoing.routing_key)) for outgoing in messages]
        for outgoing, queues in routed:
            if not queues:
                raise Unroutable(f"no queue is bound for routing key {outgoing.routing_key!r}")
        for outgoing, queues in routed:
            for queue in queues:
                queue.enqueue(
                    _Message(
                        outgoing.routing_key,
                        outgoing.body,
                        outgoing.message_id,
                        dict(outgoing.headers),
                    )
                )

    def _queue(self, queue: str) -> _Queue:
        try:
            return self._queues[queue]
        except KeyError:
            raise TransportError(f"queue {queue!r} is not declared") from None

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 64) -> Subscription:
        target = self._queue(queue)
        consumer = _Consumer(target, handler, prefetch, self._consumers.discard)
        self._consumers.add(consumer)
        target.consumers.append(consumer)
        target.dispatch()
        return consumer

    async def park(self, queue: str, message: Outgoing, reason: str) -> None:
        self._queue(queue).park(
            _Message(message.routing_key, message.body, message.message_id, dict(message.headers)),
            reason,
        )

    async def parked(self, queue: str, limit: int = 100) -> list[Parked]:
        return list(self._queue(queue).parked[:limit])

    async def replay_parked(self, queue: str, message_ids: Sequence[str] | None = None) -> int:
        target = self._queue(queue)
        wanted = None if message_ids is None else set(message_ids)
        keep: list[Parked] = []
        moved: list[Parked] = []
        for parked in target.parked:
            (moved if wanted is None or parked.message_id in wanted else keep).append(parked)
        target.parked = keep
        for parked in moved:
            target.enqueue(
                _Message(parked.routing_key, parked.body, parked.message_id, dict(parked.headers))
            )
        return len(moved)

    async def queue_depths(self) -> dict[str, int]:
        depths: dict[str, int] = {}
        for name, queue in self._queues.items():
            depths[name] = len(queue.ready)
            depths[parking_lot(name)] = len(queue.parked)
        return depths
