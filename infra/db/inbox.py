"""Inbox de-duplication and the transactional consumer every service uses.

A message's effect, its inbox row and the messages it causes (outbox) commit in one
transaction; the delivery is acked only after that commit. A redelivery (crash before the
ack, a duplicate from the broker or a publisher that published twice) finds its id in the
inbox and is acked without running the effect again.

Two ways in:

- ``handle_idempotently(db, message, effect)`` for one message;
- ``InboxConsumer(db, transport, queue, handle_batch, relay=relay)``: consumes a queue and
  runs each *batch* of deliveries that arrived meanwhile in one transaction (group commit:
  one fsync for many messages). ``handle_batch(conn, messages)`` returns the messages to
  send. If a batch fails, its messages are retried one by one so that one bad message
  cannot hold up the others; a message that keeps failing reaches the queue's delivery
  limit and is parked. An undecodable message is parked at once with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from infra.batches import Batches
from infra.db.database import Database
from infra.db.fast import chunks, fetch, values_list
from infra.db.outbox import OutboxRelay, add_to_outbox
from infra.transport.base import Delivery, Outgoing, Subscription, Transport
from protocol.envelope import InvalidMessage, Message, decode
from protocol.errors import Disposition, JpkiError

log = structlog.get_logger(__name__)

Effect = Callable[[AsyncConnection, Message], Awaitable[Sequence[Outgoing]]]
BatchEffect = Callable[[AsyncConnection, list[Message]], Awaitable[Sequence[Outgoing]]]
# Work a batch needs done before its transaction opens, and undone after it ends however it
# ends (the CA signs a batch's certificates with no transaction open).
AroundBatch = Callable[[list[Message]], contextlib.AbstractAsyncContextManager[None]]


async def claim_inbox(
    conn: AsyncConnection, message_ids: Sequence[str], *, now: float | None = None
) -> set[str]:
    """Record ``message_ids`` as handled; returns those not seen before."""
    received = time.time() if now is None else now
    fresh: set[str] = set()
    for chunk in chunks(list(dict.fromkeys(message_ids)), 500):
        sql = (  # only placeholders are formatted in
            f"INSERT INTO inbox (message_id, received_at) VALUES {values_list(2, len(chunk))} "  # noqa: S608
            "ON CONFLICT (message_id) DO NOTHING RETURNING message_id"
        )
        params = tuple(value for m in chunk for value in (m, received))
        fresh.update(row[0] for row in await fetch(conn, sql, params))
    return fresh


async def handle_idempotently(
    db: Database,
    message: Message,
    effect: Effect,
    *,
    relay: OutboxRelay | None = None,
    now: float | None = None,
) -> bool:
    """Run ``effect`` once per message id; returns False for an already handled message."""
    async with db.transaction() as conn:
        if not await claim_inbox(conn, [message.envelope.message_id], now=now):
            return False
        out = list(await effect(conn, message))
        await add_to_outbox(conn, out, now=now)
    if relay is not None:
        relay.handoff(out)
    return True


class InboxConsumer:
    def __init__(
        self,
        db: Database,
        transport: Transport,
        queue: str,
        handle_batch: BatchEffect,
        *,
        relay: OutboxRelay | None = None,
        around_batch: AroundBatch | None = None,
        batch_size: int = 256,
        prefetch: int = 512,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._transport = transport
        self._queue = queue
        self._handle_batch = handle_batch
        self._around_batch = around_batch
        self._relay = relay
        self._prefetch = prefetch
        self._clock = clock
        self._batches: Batches[tuple[Delivery, Message]] = Batches(
            self._run_batch_safely, batch_size=batch_size, name=f"inbox-{queue}"
        )
        self._subscription: Subscription | None = None
        self.handled = 0
        self.duplicates = 0

    async def start(self) -> None:
        self._batches.start()
        self._subscription = await self._transport.consume(
            self._queue, self._on_delivery, prefetch=self._prefetch
        )

    async def stop(self) -> None:
        if self._subscription is not None:
            await self._subscription.cancel()
            self._subscription = None
        await self._batches.stop()

    async def _on_delivery(self, delivery: Delivery) -> None:
        try:
            message = decode(delivery.body)
        except InvalidMessage as exc:
            log.warning("message_parked", queue=self._queue, message_id=delivery.message_id,
                        reason=str(exc))
            await delivery.park(str(exc))
            return
        # Returns unsettled: the worker settles it once its batch commits, and until then
        # it stays in flight (counted against prefetch). No task or future waits for it.
        self._batches.put((delivery, message))

    async def _run_batch_safely(self, batch: list[tuple[Delivery, Message]]) -> None:
        try:
            await self._run_batch(batch)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("inbox_batch_crashed", queue=self._queue)
            for delivery, _ in batch:  # give back what is not settled yet
                with contextlib.suppress(Exception):
                    await delivery.retry()

    async def _run_batch(self, batch: list[tuple[Delivery, Message]]) -> None:
        try:
            out = await self._commit([m for _, m in batch])
        except Exception as exc:
            if len(batch) == 1:
                await self._failed(batch[0][0], exc)
                return
            log.warning("inbox_batch_failed_retrying_singly", queue=self._queue,
                        size=len(batch), error=type(exc).__name__)
            for item in batch:
                await self._run_batch([item])
            return
        # one merged ack where the transport can; a lost ack means a redelivery: deduplicated
        with contextlib.suppress(Exception):
            await self._transport.ack_many([delivery for delivery, _ in batch])
        if self._relay is not None:
            self._relay.handoff(out)

    async def _commit(self, messages: list[Message]) -> list[Outgoing]:
        if self._around_batch is None:
            return await self._commit_batch(messages)
        async with self._around_batch(messages):
            return await self._commit_batch(messages)

    async def _commit_batch(self, messages: list[Message]) -> list[Outgoing]:
        now = self._clock()
        async with self._db.transaction() as conn:
            fresh_ids = await claim_inbox(conn, [m.envelope.message_id for m in messages], now=now)
            fresh: list[Message] = []
            for message in messages:
                if message.envelope.message_id in fresh_ids:
                    fresh_ids.discard(message.envelope.message_id)  # a duplicate in this batch
                    fresh.append(message)
            self.duplicates += len(messages) - len(fresh)
            out = list(await self._handle_batch(conn, fresh)) if fresh else []
            await add_to_outbox(conn, out, now=now)
        self.handled += len(fresh)
        return out

    async def _failed(self, delivery: Delivery, exc: Exception) -> None:
        if isinstance(exc, JpkiError) and exc.disposition is Disposition.REJECTED:
            log.warning("message_rejected_parked", queue=self._queue,
                        message_id=delivery.message_id, error=type(exc).__name__)
            await delivery.park(type(exc).__name__)  # its text may carry message data
            return
        log.warning("message_failed_retry", queue=self._queue, message_id=delivery.message_id,
                    delivery_count=delivery.delivery_count, error=type(exc).__name__)
        await delivery.retry()
