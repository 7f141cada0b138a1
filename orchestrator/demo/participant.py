"""The demo participant: applies reserve/charge/ship and their undos, and counts them.

Every effect is a row in ``demo_effects``, written in the same transaction as the inbox
row of the command and the outbox row of the reply. Idempotency has two layers:
- a redelivered *message* is caught by the inbox;
- a retried *step* (a new attempt, a new message id) finds its effect already logged and
  answers the same again.
An undo that finds nothing to undo leaves a ``cancel`` tombstone, so a late do of that step
(an earlier attempt still in a queue) is refused instead of acting after compensation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import structlog
from sqlalchemy import BigInteger, Column, Float, Index, Integer, MetaData, String, Table, select
from sqlalchemy.ext.asyncio import AsyncConnection

from infra.db.database import Database
from infra.db.inbox import InboxConsumer
from infra.db.outbox import OutboxRelay, outgoing
from infra.transport.base import Outgoing, Transport
from orchestrator.demo.messages import ACTIONS, DemoCommand, StepReply
from orchestrator.saga.flow import Failure
from protocol.envelope import Message, build

log = structlog.get_logger(__name__)

metadata = MetaData()
demo_effects = Table(
    "demo_effects",
    metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("saga_id", String(100), nullable=False),
    Column("step", String(64), nullable=False),
    Column("action", String(10), nullable=False),  # do | undo | cancel
    Column("message_id", String(200), nullable=False),
    Column("applied_at", Float, nullable=False),
)
Index("ix_demo_effects_saga", demo_effects.c.saga_id, demo_effects.c.step)

QUEUE = "demo-participant"
BINDINGS = ("demo.cmd.#",)


class DemoParticipant:
    def __init__(
        self,
        db: Database,
        transport: Transport,
        *,
        queue: str = QUEUE,
        batch_size: int = 256,
        work_seconds: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        # simulated work per command, so that a crash test can catch sagas mid-run however
        # fast the machine is
        self.work_seconds = work_seconds
        self.transport = transport
        self.queue = queue
        self.clock = clock
        self.relay = OutboxRelay(db, transport, clock=clock, name=queue)
        self.consumer = InboxConsumer(db, transport, queue, self.handle, relay=self.relay,
                                      batch_size=batch_size, clock=clock)

    async def start(self) -> None:
        await self.transport.declare_queue(self.queue, BINDINGS)
        await self.relay.start()
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.relay.stop()

    async def handle(self, conn: AsyncConnection, messages: list[Message]) -> Sequence[Outgoing]:
        saga_ids = sorted({m.envelope.saga_id for m in messages if m.envelope.saga_id})
        logged: set[tuple[str, str, str]] = set()
        if saga_ids:
            query = select(demo_effects.c.saga_id, demo_effects.c.step, demo_effects.c.action)
            query = query.where(demo_effects.c.saga_id.in_(saga_ids))
            logged = {tuple(row) for row in (await conn.execute(query)).all()}  # type: ignore[misc]
        now = self.clock()
        effects: list[dict[str, object]] = []
        replies: list[Outgoing] = []
        for message in messages:
            body, saga_id = message.body, message.envelope.saga_id
            if not isinstance(body, DemoCommand) or type(body) not in ACTIONS or not saga_id:
                log.warning("demo_participant_ignored", type=message.envelope.type)
                continue
            step, action = ACTIONS[type(body)]
            if body.stall:
                continue
            reply = self._apply(saga_id, step, action, body, logged)
            for kind in self._new_rows(saga_id, step, action, reply, logged):
                logged.add((saga_id, step, kind))
                effects.append({"saga_id": saga_id, "step": step, "action": kind,
                                "message_id": message.envelope.message_id, "applied_at": now})
            # one reply per command, with an id derived from it: if this transaction is
            # ever run twice, the orchestrator's inbox sees the same reply twice
            command_id = message.envelope.message_id
            replies.append(outgoing(build(reply, saga_id=saga_id, causation_id=command_id,
                                          message_id=f"{command_id}/reply")))
        if effects:
            await conn.execute(demo_effects.insert(), effects)
        if self.work_seconds:
            await asyncio.sleep(self.work_seconds * len(messages))
        return replies

    @staticmethod
    def _apply(
        saga_id: str, step: str, action: str, body: DemoCommand, logged: set[tuple[str, str, str]]
    ) -> StepReply:
        if action == "do":
            if (saga_id, step, "undo") in logged or (saga_id, step, "cancel") in logged:
                return StepReply(step=step, action=action, applied=False,
                                 failure=Failure(code="already_compensated"))
            if body.reject:
                return StepReply(step=step, action=action, applied=False,
                                 failure=Failure(code="rejected_on_request"))
            return StepReply(step=step, action=action, applied=True)
        return StepReply(step=step, action=action, applied=(saga_id, step, "do") in logged)

    @staticmethod
    def _new_rows(
        saga_id: str, step: str, action: str, reply: StepReply, logged: set[tuple[str, str, str]]
    ) -> list[str]:
        if reply.failure is not None:
            return []
        if action == "do":
            return [] if (saga_id, step, "do") in logged else ["do"]
        if (saga_id, step, "undo") in logged or (saga_id, step, "cancel") in logged:
            return []
        return ["undo" if reply.applied else "cancel"]


async def effect_log(db: Database) -> list[tuple[str, str, str]]:
    """Every effect applied, in order: (saga id, step, do|undo|cancel)."""
    query = select(demo_effects.c.saga_id, demo_effects.c.step, demo_effects.c.action)
    async with db.transaction() as conn:
        rows = (await conn.execute(query.order_by(demo_effects.c.seq))).all()
    return [(r.saga_id, r.step, r.action) for r in rows]
