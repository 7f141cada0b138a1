"""Transactional outbox: write messages with the state change, publish them after commit.

``add_to_outbox(conn, messages)`` inside the transaction that changes state; the
``OutboxRelay`` of the process then publishes pending rows through the transport (which
returns only after publisher confirms) and deletes them: the outbox holds only what is
still to be published. A crash between publish and delete publishes the row again:
delivery is at-least-once and receivers de-duplicate by message id (the inbox).

Claiming: on PostgreSQL any number of relays run at once; each claims a batch with
``SELECT ... FOR UPDATE SKIP LOCKED`` and keeps the row locks until the publish is confirmed
and the rows are deleted, so two relays never hold the same row and a relay that dies
releases its rows with its connection. On SQLite the file belongs to one process with one
relay; it reads the batch under the write lock, publishes, and deletes the rows. Rows
the process itself just committed skip the claim (``handoff``): see ``OutboxRelay``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import structlog
from sqlalchemy import delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from infra.db.database import Database
from infra.db.fast import execute_many
from infra.db.messaging import inbox, outbox
from infra.transport.base import Outgoing, Transport
from protocol.envelope import Message, encode

log = structlog.get_logger(__name__)

_headers_encoder = msgspec.json.Encoder()
_headers_decoder = msgspec.json.Decoder(dict[str, str])


def outgoing(message: Message, *, routing_key: str | None = None) -> Outgoing:
    """A built envelope as a transport message; routed by its type unless told otherwise
    (messages to a phone go to ``device.<device_id>``)."""
    envelope = message.envelope
    return Outgoing(
        routing_key=routing_key or envelope.type,
        body=encode(message),
        message_id=envelope.message_id,
    )


def to_device(message: Message) -> Outgoing:
    device_id = message.envelope.device_id
    if not device_id:
        raise ValueError(f"{message.envelope.type} to a device needs a device_id")
    return outgoing(message, routing_key=f"device.{device_id}")


_INSERT_OUTBOX = (
    "INSERT INTO outbox (message_id, routing_key, body, headers, created_at) "
    "VALUES (?, ?, ?, ?, ?)"
)


async def add_to_outbox(
    conn: AsyncConnection, messages: Sequence[Outgoing], *, now: float | None = None
) -> None:
    if not messages:
        return
    created = time.time() if now is None else now
    await execute_many(
        conn,
        _INSERT_OUTBOX,
        [
            (
                m.message_id,
                m.routing_key,
                m.body,
                _headers_encoder.encode(m.headers).decode() if m.headers else None,
                created,
            )
            for m in messages
        ],
    )


def _row_to_outgoing(row: Any) -> Outgoing:
    headers = _headers_decoder.decode(row.headers) if row.headers else {}
    return Outgoing(
        routing_key=row.routing_key, body=row.body, message_id=row.message_id, headers=headers
    )


class OutboxRelay:
    """Publishes a service's outbox rows.

    Fast path: after a commit, the committer hands the rows it wrote to ``handoff()``; the
    relay publishes them at once and deletes them in one statement per ``delete_interval``
    (a crash before the delete republishes them: at-least-once). Recovery path: every
    ``poll_interval`` (and at start) the relay claims pending rows older than ``grace``
    seconds (rows whose handoff died with a process, or whose publish failed) - with
    ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so any number of relays share the work.
    ``fast_path=False`` leaves everything to the claim path (``wake()`` runs it now).

    Rows a publish could not place (broker refused, no queue bound yet) are retried after
    ``retry_delay`` without holding up the others. Inbox ids are purged after
    ``keep_inbox`` seconds (the inbox must outlive any redelivery, so keep it far longer
    than a message can wait in a queue).
    """

    def __init__(
        self,
        db: Database,
        transport: Transport,
        *,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        grace: float = 5.0,
        fast_path: bool = True,
        delete_interval: float = 0.25,
        retry_delay: float = 2.0,
        keep_inbox: float = 7 * 86400.0,
        clock: Callable[[], float] = time.time,
        name: str = "relay",
    ) -> None:
        self._db = db
        self._transport = transport
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._grace = grace if fast_path else 0.0
        self._fast_path = fast_path
        self._delete_interval = delete_interval
        self._retry_delay = retry_delay
        self._keep_inbox = keep_inbox
        self._clock = clock
        self._name = name
        self._wake = asyncio.Event()
        self._poll_now = True
        self._handed: list[Outgoing] = []
        self._in_flight: set[str] = set()  # handed off, not yet deleted
        self._to_delete: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._last_poll = 0.0
        self._last_delete = 0.0
        self._last_purge = 0.0
        self.published = 0

    def handoff(self, messages: Sequence[Outgoing]) -> None:
        """Publish these just-committed outbox rows soon (they are durable already)."""
        if not messages:
            return
        if self._fast_path and self._task is not None:
            self._handed.extend(messages)
            self._in_flight.update(m.message_id for m in messages)
        else:
            self._poll_now = True
        self._wake.set()

    def wake(self) -> None:
        """Run the claim path now (rows were added without a handoff)."""
        self._poll_now = True
        self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            self._poll_now = True
            self._task = asyncio.create_task(self._run(), name=f"outbox-{self._name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(Exception):
            await self._delete_sent()  # what was published need not be published again
        self._handed.clear()
        self._in_flight.clear()

    async def _run(self) -> None:
        while True:
            try:
                await self._publish_handed()
                now = self._clock()
                # Deleting what was sent is bookkeeping: batch it so it does not compete
                # for the database with the work itself.
                if self._to_delete and (now - self._last_delete >= self._delete_interval
                                       or len(self._to_delete) >= 10_000):
                    await self._delete_sent()
                if self._poll_now or now - self._last_poll >= self._poll_interval:
                    self._poll_now = False
                    self._last_poll = now
                    while await self.relay_once() >= self._batch_size:
                        pass
                    await self._maybe_purge()
            except asyncio.CancelledError:
                raise
            except Exception:  # the relay must outlive a database or broker outage
                log.exception("outbox_relay_failed", relay=self._name)
                await asyncio.sleep(self._retry_delay)
            if self._handed:
                continue
            timeout = self._delete_interval if self._to_delete else self._poll_interval
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel
            # that arrives as its wait completes (CPython gh-86296), and stop() would hang.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()

    async def _publish_handed(self) -> None:
        while self._handed:
            batch = self._handed[:1000]
            del self._handed[: len(batch)]
            try:
                await self._transport.publish(batch)
            except Exception as exc:
                # The rows stay pending in the table: the claim path retries them one by one.
                log.warning("outbox_fast_publish_failed", relay=self._name, rows=len(batch),
                            error=type(exc).__name__)
                self._in_flight.difference_update(m.message_id for m in batch)
                self._poll_now = True
                continue
            self.published += len(batch)
            self._to_delete.extend(m.message_id for m in batch)

    async def _delete_sent(self) -> None:
        if not self._to_delete:
            return
        ids, self._to_delete = self._to_delete, []
        self._last_delete = self._clock()
        try:
            async with self._db.transaction() as conn:
                for start in range(0, len(ids), 1000):
                    chunk = ids[start : start + 1000]
                    await conn.execute(delete(outbox).where(outbox.c.message_id.in_(chunk)))
        except BaseException:
            # Still published and still in flight: kept for the next try, or the rows would
            # stay in the table, skipped as in flight, until a restart published them again.
            self._to_delete[:0] = ids
            raise
        self._in_flight.difference_update(ids)

    def _pending(self, now: float) -> Any:
        # At start nothing of ours is in flight: rows a dead process left are taken at once.
        grace = self._grace if self.published else 0.0
        return (
            select(outbox.c.id, outbox.c.message_id, outbox.c.routing_key, outbox.c.body,
                   outbox.c.headers)
            .where(outbox.c.created_at <= now - grace,
                   or_(outbox.c.retry_at.is_(None), outbox.c.retry_at <= now))
            .order_by(outbox.c.id)
            .limit(self._batch_size)
        )

    async def relay_once(self) -> int:
        """Claim, publish and delete one batch of pending rows; returns how many it published
        (rows already in flight on the fast path are left to it, so a full batch of those
        ends the loop instead of spinning on them)."""
        await self._delete_sent()
        now = self._clock()
        if self._db.is_postgres:
            async with self._db.transaction() as conn:
                claim = self._pending(now).with_for_update(skip_locked=True)
                rows = (await conn.execute(claim)).all()
                mine = [r for r in rows if r.message_id not in self._in_flight]
                if mine:
                    await self._publish_and_delete(conn, mine)
            return len(mine)
        async with self._db.transaction() as conn:
            rows = (await conn.execute(self._pending(now))).all()
        mine = [r for r in rows if r.message_id not in self._in_flight]
        if mine:
            async with self._db.transaction() as conn:
                await self._publish_and_delete(conn, mine)
        return len(mine)

    async def _publish_and_delete(self, conn: AsyncConnection, rows: Sequence[Any]) -> None:
        sent_ids: list[int] = []
        failed_ids: list[int] = []
        try:
            await self._transport.publish([_row_to_outgoing(r) for r in rows])
            sent_ids = [r.id for r in rows]
        except Exception as exc:
            # One message that cannot be placed must not hold up the batch: try each.
            log.warning("outbox_batch_publish_failed", relay=self._name, rows=len(rows),
                        error=type(exc).__name__)
            for row in rows:
                try:
                    await self._transport.publish([_row_to_outgoing(row)])
                    sent_ids.append(row.id)
                except Exception as one_exc:
                    log.warning("outbox_publish_failed", relay=self._name,
                                message_id=row.message_id, routing_key=row.routing_key,
                                error=type(one_exc).__name__, detail=str(one_exc)[:200])
                    failed_ids.append(row.id)
        now = self._clock()
        if sent_ids:
            await conn.execute(delete(outbox).where(outbox.c.id.in_(sent_ids)))
            self.published += len(sent_ids)
        if failed_ids:
            await conn.execute(
                update(outbox).where(outbox.c.id.in_(failed_ids))
                .values(retry_at=now + self._retry_delay)
            )

    async def _maybe_purge(self) -> None:
        now = self._clock()
        if now - self._last_purge < 60.0:
            return
        self._last_purge = now
        async with self._db.transaction() as conn:
            await conn.execute(delete(inbox).where(inbox.c.received_at < now - self._keep_inbox))
