"""The one transport interface (in-process, RabbitMQ; MQTT for phones has its own link).

Semantics every implementation keeps, so that code tested on the in-process transport
behaves the same on RabbitMQ:
- ``publish`` returns only when every message is durably accepted (publisher confirms);
- a delivery is acked, retried (requeued; counts toward the queue's delivery limit, past
  which it goes to the queue's parking lot) or parked at once with a reason;
- an unacked delivery of a consumer that goes away is redelivered (``redelivered`` set);
- parked messages can be listed and replayed to their original queue.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import structlog

from protocol.errors import Disposition, JpkiError

PARKING_SUFFIX = ".parking"  # queue ``q`` dead-letters into ``q.parking``
DEFAULT_DELIVERY_LIMIT = 5  # failed deliveries a message may have before it is parked
DELIVERY_LIMIT_REASON = "delivery limit exceeded"


def parking_lot(queue: str) -> str:
    return queue + PARKING_SUFFIX


class TransportError(JpkiError):
    """The broker refused or lost contact while we published; safe to try again."""

    disposition = Disposition.TRANSIENT


class TopologyMismatch(JpkiError):
    """A queue re-declared with other arguments than it has: a configuration error."""


class Unroutable(JpkiError):
    """No queue is bound for a routing key, so the message would be lost: refused instead."""


@dataclass(frozen=True, slots=True)
class Outgoing:
    routing_key: str
    body: bytes
    message_id: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Parked:
    queue: str
    message_id: str
    routing_key: str
    body: bytes
    reason: str
    parked_at: float
    headers: dict[str, str] = field(default_factory=dict)


class Delivery(ABC):
    routing_key: str
    body: bytes
    message_id: str
    headers: dict[str, str]
    redelivered: bool
    delivery_count: int  # 1 on the first attempt, +1 for every earlier failed delivery

    @abstractmethod
    async def ack(self) -> None: ...

    @abstractmethod
    async def retry(self) -> None:
        """Requeue; past the queue's delivery limit the message is parked."""

    @abstractmethod
    async def park(self, reason: str) -> None:
        """Dead-letter now into the queue's parking lot, keeping ``reason``."""


Handler = Callable[[Delivery], Awaitable[None]]

log = structlog.get_logger(__name__)


async def handle_or_retry(handler: Handler, delivery: Delivery, queue: str) -> None:
    """Run a consumer's handler on ``delivery``. A handler that raises has a bug, which must
    not kill the consumer: the delivery is retried (and parked past the delivery limit)."""
    try:
        await handler(delivery)
    except Exception as exc:
        log.warning("transport.handler_raised", queue=queue, message_id=delivery.message_id,
                    error=type(exc).__name__)
        await delivery.retry()


class Subscription(ABC):
    @abstractmethod
    async def cancel(self) -> None:
        """Stop consuming; handlers still running are cancelled and their unsettled
        deliveries go back to the queue, marked redelivered."""


class Transport(ABC):
    @abstractmethod
    async def connect(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def declare_queue(
        self,
        queue: str,
        binding_keys: Sequence[str],
        *,
        delivery_limit: int | None = None,
        single_active_consumer: bool = False,
    ) -> None:
        """Declare (idempotently) a durable queue, its parking lot and its bindings.

        ``delivery_limit`` (default: the transport's) counts failed deliveries (retries,
        consumers gone with the message unacked): the message is parked when it fails
        once more than that, so it is delivered at most ``delivery_limit + 1`` times.
        ``single_active_consumer``: only one consumer at a time gets messages (the others
        wait as hot standbys), which keeps the queue's order across several processes.
        """

    @abstractmethod
    async def publish(self, messages: Sequence[Outgoing]) -> None:
        """Publish and wait for every confirm; ``Unroutable`` if a message has no queue."""

    @abstractmethod
    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 64) -> Subscription:
        """Run ``handler`` for each delivery, at most ``prefetch`` unsettled at once.

        A handler that raises with its delivery unsettled gets it retried.
        """

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Ack deliveries of this transport together (a batch whose effects committed);
        a transport may merge the acks into fewer frames. Settled ones are skipped."""
        for delivery in deliveries:
            await delivery.ack()

    @abstractmethod
    async def park(self, queue: str, message: Outgoing, reason: str) -> None:
        """Put a message that never reached ``queue`` (refused at the edge, e.g. by the
        gateway) straight into ``queue``'s parking lot, with ``reason``."""

    @abstractmethod
    async def parked(self, queue: str, limit: int = 100) -> list[Parked]: ...

    @abstractmethod
    async def replay_parked(self, queue: str, message_ids: Sequence[str] | None = None) -> int:
        """Move parked messages back to ``queue``; returns how many moved."""

    @abstractmethod
    async def queue_depths(self) -> dict[str, int]:
        """Ready messages per queue (parking lots included), for operators and metrics."""
