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


class Delivery(ABC):
    routing_key: str
    body: bytes
    message_id: str
    headers: dict[str, str]
    redelivered: bool
    delivery_count: int

    @abstractmethod
    async def ack(self) -> None: ...

    @abstractmethod
    async def retry(self) -> None:
        """Requeue; past the queue's delivery limit the message is parked."""

    @abstractmethod
    async def park(self, reason: str) -> None:
        """Dead-letter now into the queue's parking lot, keeping ``reason``."""


Handler = Callable[[Delivery], Awaitable[None]]


class Subscription(ABC):
    @abstractmethod
    async def cancel(self) -> None: ...


class Transport(ABC):
    @abstractmethod
    async def connect(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def declare_queue(self, queue: str, binding_keys: Sequence[str]) -> None:
        """Declare (idempotently) a durable queue, its parking lot and its bindings."""

    @abstractmethod
    async def publish(self, messages: Sequence[Outgoing]) -> None: ...

    @abstractmethod
    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 64) -> Subscription: ...

    @abstractmethod
    async def parked(self, queue: str, limit: int = 100) -> list[Parked]: ...

    @abstractmethod
    async def replay_parked(self, queue: str, message_ids: Sequence[str] | None = None) -> int:
        """Move parked messages back to ``queue``; returns how many moved."""

    @abstractmethod
    async def queue_depths(self) -> dict[str, int]:
        """Ready messages per queue (parking lots included), for operators and metrics."""
