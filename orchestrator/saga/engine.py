"""The saga engine's async shell: load states, run ``Machine`` transitions, persist.

Every input goes through one transaction that holds the sagas it touches (PostgreSQL:
``SELECT ... FOR UPDATE`` in saga-id order; SQLite: the write lock), applies the
transitions, and writes the states (``version`` + 1), the timeline, the timers and the
outgoing commands (outbox) together. Replies and events arrive through an
``InboxConsumer`` that hands over whole batches, so one commit serves many sagas; the
outbox relay publishes after the commit.

Timers are rows: a loop polls the due ones (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, and
it skips sagas another transaction holds, so several orchestrators share the work).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from prometheus_client import Counter, Histogram
from sqlalchemy import and_, bindparam, delete, func, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from infra.db.database import Database
from infra.db.inbox import InboxConsumer
from infra.db.outbox import OutboxRelay, add_to_outbox
from infra.transport.base import Outgoing, Transport
from orchestrator.saga.flow import Flow, FlowRegistry
from orchestrator.saga.machine import (
    Effects,
    Machine,
    SagaState,
    TimelineEntry,
    Timer,
)
from orchestrator.saga.tables import saga_timeline, saga_timers, sagas
from protocol.envelope import Message
from protocol.errors import Disposition, JpkiError

log = structlog.get_logger(__name__)

SAGA_TRANSITIONS = Counter(
    "jpki_saga_transitions_total", "Saga status changes", ["flow", "from_status", "to_status"]
)
STEP_LATENCY = Histogram(
    "jpki_saga_step_seconds", "From sending a step's command to its answer", ["flow", "step"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

_completed_encoder = msgspec.json.Encoder()
_completed_decoder = msgspec.json.Decoder(list[int])


class SagaNotFound(JpkiError):
    """No saga with that id in this orchestrator."""


class ConcurrentUpdate(JpkiError):
    """A saga changed under us (its version moved): the batch is retried."""

    disposition = Disposition.TRANSIENT


@dataclass(frozen=True, slots=True)
class TimelineRow:
    at: float
    event: str
    step: str | None
    attempt: int | None
    detail: str | None


@dataclass(frozen=True, slots=True)
class SagaView:
    saga_id: str
    flow: str
    status: str
    paused: bool
    step: str | None
    attempt: int
    waiting: str | None
    data: Any
    reason: str | None
    version: int
    created_at: float
    updated_at: float


class SagaEngine:
    def __init__(
        self,
        db: Database,
        transport: Transport,
        flows: Iterable[Flow[Any]],
        *,
        queue: str = "orchestrator",
        bindings: Sequence[str] = ("*.reply.#", "app.event.#"),
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        batch_size: int = 256,
        prefetch: int = 1024,
        timer_interval: float = 0.1,
        relay: OutboxRelay | None = None,
    ) -> None:
        self.db = db
        self.transport = transport
        self.registry = FlowRegistry()
        for flow in flows:
            self.registry.add(flow)
        self._starters = {f.start_on: f for f in self.registry.flows.values() if f.start_on}
        self.queue = queue
        self.bindings = tuple(bindings)
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter and ids, not secrets
        self.machine = Machine(clock, self.rng)
        self.relay = relay or OutboxRelay(db, transport, clock=clock, name=queue)
        self.consumer = InboxConsumer(
            db, transport, queue, self._handle_batch, relay=self.relay,
            batch_size=batch_size, prefetch=prefetch, clock=clock,
        )
        self._timer_interval = timer_interval
        self._timer_task: asyncio.Task[None] | None = None

    # -- life cycle --------------------------------------------------------------------------
    async def start(self) -> None:
        await self.transport.declare_queue(self.queue, self.bindings)
        await self.relay.start()
        await self.consumer.start()
        self._timer_task = asyncio.create_task(self._timer_loop(), name=f"timers-{self.queue}")

    async def stop(self) -> None:
        task, self._timer_task = self._timer_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.consumer.stop()
        await self.relay.stop()

    # -- starting sagas ----------------------------------------------------------------------
    def new_saga_id(self) -> str:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4).hex

    async def start_saga(self, flow: Flow[Any], data: Any, *, saga_id: str | None = None) -> str:
        return (await self.start_sagas(flow, [data], saga_ids=[saga_id] if saga_id else None))[0]

    async def start_sagas(
        self, flow: Flow[Any], datas: Sequence[Any], *, saga_ids: Sequence[str] | None = None
    ) -> list[str]:
        """Start many sagas in one transaction (their first commands go out together)."""
        self.registry.get(flow.name)
        ids = list(saga_ids) if saga_ids else [self.new_saga_id() for _ in datas]
        fx = Effects()
        async with self.db.transaction() as conn:
            existing = await self._load(conn, ids)
            states = [
                self.machine.new_saga(flow, saga_id, data, fx)
                for saga_id, data in zip(ids, datas, strict=True)
                if saga_id not in existing
            ]
            await self._persist(conn, states, fx)
        self._after_commit(fx)
        return ids

    # -- operators ---------------------------------------------------------------------------
    async def pause(self, saga_id: str, reason: str = "operator") -> bool:
        return await self._operate(saga_id, lambda s, fx: self.machine.pause(s, reason, fx))

    async def resume(self, saga_id: str) -> bool:
        return await self._operate(saga_id, self.machine.resume)

    async def _operate(self, saga_id: str, change: Callable[[SagaState, Effects], bool]) -> bool:
        fx = Effects()
        async with self.db.transaction() as conn:
            state = (await self._load(conn, [saga_id])).get(saga_id)
            if state is None:
                raise SagaNotFound(f"no saga {saga_id}")
            done = change(state, fx)
            await self._persist(conn, [state], fx)
        self._after_commit(fx)
        return done

    async def get(self, saga_id: str) -> SagaView:
        async with self.db.transaction() as conn:
            state = (await self._load(conn, [saga_id], lock=False)).get(saga_id)
        if state is None:
            raise SagaNotFound(f"no saga {saga_id}")
        step = state.current_step
        return SagaView(
            saga_id=state.saga_id, flow=state.flow.name, status=state.status,
            paused=state.paused, step=step.name if step else None, attempt=state.attempt,
            waiting=state.waiting, data=state.data, reason=state.reason,
            version=state.version, created_at=state.created_at, updated_at=state.updated_at,
        )

    async def timeline(self, saga_id: str) -> list[TimelineRow]:
        query = (
            select(saga_timeline.c.at, saga_timeline.c.event, saga_timeline.c.step,
                   saga_timeline.c.attempt, saga_timeline.c.detail)
            .where(saga_timeline.c.saga_id == saga_id)
            .order_by(saga_timeline.c.id)
        )
        async with self.db.transaction() as conn:
            rows = (await conn.execute(query)).all()
        return [TimelineRow(*row) for row in rows]

    async def counts(self) -> dict[str, int]:
        query = select(sagas.c.status, func.count()).group_by(sagas.c.status)
        async with self.db.transaction() as conn:
            return {status: n for status, n in (await conn.execute(query)).all()}

    async def list_sagas(self, status: str | None = None, limit: int = 100) -> list[str]:
        query = select(sagas.c.saga_id).order_by(sagas.c.created_at).limit(limit)
        if status is not None:
            query = query.where(sagas.c.status == status)
        async with self.db.transaction() as conn:
            return list((await conn.execute(query)).scalars())

    # -- replies and events ----------------------------------------------------------------
    async def _handle_batch(self, conn: AsyncConnection, messages: list[Message]) -> list[Outgoing]:
        fx = Effects()
        targets: list[tuple[str, Message]] = []
        for message in messages:
            saga_id = message.envelope.saga_id
            if type(message.body) in self._starters and saga_id is None:
                saga_id = message.envelope.message_id
            if saga_id is None:
                log.warning("message_without_saga", type=message.envelope.type,
                            message_id=message.envelope.message_id)
                continue
            targets.append((saga_id, message))
        states = await self._load(conn, sorted({saga_id for saga_id, _ in targets}))
        touched: dict[str, SagaState] = {}
        for saga_id, message in targets:
            state = states.get(saga_id)
            starter = self._starters.get(type(message.body))
            if state is None:
                if starter is None:
                    log.warning("message_for_unknown_saga", saga_id=saga_id,
                                type=message.envelope.type)
                    continue
                data = starter.initial(message)  # type: ignore[misc]
                state = states[saga_id] = self.machine.new_saga(starter, saga_id, data, fx)
            elif starter is not None and starter is state.flow and not self._is_reply(message):
                continue  # the start message again (re-sent by its sender): already running
            else:
                self.machine.on_message(state, message, fx)
            touched[saga_id] = state
        await self._persist(conn, list(touched.values()), fx)  # outbox rows included
        self._after_commit_metrics(fx)
        return []

    @staticmethod
    def _is_reply(message: Message) -> bool:
        return message.envelope.causation_id is not None and ":" in message.envelope.causation_id

    # -- timers ----------------------------------------------------------------------------
    async def _timer_loop(self) -> None:
        while True:
            try:
                while await self.fire_due_timers() > 0:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("saga_timer_poll_failed", queue=self.queue)
            await asyncio.sleep(self._timer_interval)

    async def fire_due_timers(self, limit: int = 256) -> int:
        """Fire the timers due by the clock's now; returns how many fired."""
        now = self.clock()
        query = (
            select(saga_timers.c.saga_id, saga_timers.c.kind, saga_timers.c.fire_at,
                   saga_timers.c.step, saga_timers.c.attempt)
            .where(saga_timers.c.fire_at <= now)
            .order_by(saga_timers.c.fire_at)
            .limit(limit)
        )
        if self.db.is_postgres:
            query = query.with_for_update(skip_locked=True)
        fx = Effects()
        async with self.db.transaction() as conn:
            due = (await conn.execute(query)).all()
            if not due:
                return 0
            # SKIP LOCKED on the sagas too: a saga a message batch holds waits for the next
            # poll instead of making the two transactions wait on each other.
            states = await self._load(conn, sorted({row.saga_id for row in due}), skip_locked=True)
            touched: dict[str, SagaState] = {}
            for row in due:
                state = states.get(row.saga_id)
                if state is None:
                    if not self.db.is_postgres:
                        fx.timers[(row.saga_id, row.kind)] = None  # orphan
                    continue
                self.machine.on_timer(state, row.kind, Timer(row.fire_at, row.step, row.attempt),
                                      fx)
                touched[row.saga_id] = state
            await self._persist(conn, list(touched.values()), fx)
        self._after_commit(fx)
        return len(due)

    # -- persistence -----------------------------------------------------------------------
    async def _load(
        self, conn: AsyncConnection, saga_ids: Sequence[str], *, lock: bool = True,
        skip_locked: bool = False,
    ) -> dict[str, SagaState]:
        if not saga_ids:
            return {}
        query = select(sagas).where(sagas.c.saga_id.in_(list(saga_ids))).order_by(sagas.c.saga_id)
        if lock and self.db.is_postgres:
            query = query.with_for_update(skip_locked=skip_locked)
        states: dict[str, SagaState] = {}
        for row in (await conn.execute(query)).all():
            try:
                flow = self.registry.get(row.flow)
            except JpkiError:
                log.warning("saga_of_unknown_flow", saga_id=row.saga_id, flow=row.flow)
                continue
            states[row.saga_id] = SagaState(
                saga_id=row.saga_id, flow=flow, status=row.status, paused=row.paused,
                position=row.position, attempt=row.attempt, waiting=row.waiting,
                completed=_completed_decoder.decode(row.completed),
                data=flow.decode_data(row.data), reason=row.reason, version=row.version,
                created_at=row.created_at, updated_at=row.updated_at,
            )
        return states

    async def _persist(
        self, conn: AsyncConnection, states: Sequence[SagaState], fx: Effects
    ) -> None:
        new_rows, changed_rows = [], []
        for state in states:
            if not state.changed:
                continue
            row = {
                "status": state.status, "paused": state.paused, "position": state.position,
                "attempt": state.attempt, "waiting": state.waiting,
                "completed": _completed_encoder.encode(state.completed).decode(),
                "data": state.flow.encode_data(state.data).decode(), "reason": state.reason,
                "updated_at": state.updated_at,
            }
            if state.is_new:
                row.update(saga_id=state.saga_id, flow=state.flow.name, version=1,
                           created_at=state.created_at)
                new_rows.append(row)
            else:
                row.update(b_saga_id=state.saga_id, b_version=state.version,
                           version=state.version + 1)
                changed_rows.append(row)
        if new_rows:
            await conn.execute(sagas.insert(), new_rows)
        if changed_rows:
            statement = (
                update(sagas)
                .where(and_(sagas.c.saga_id == bindparam("b_saga_id"),
                            sagas.c.version == bindparam("b_version")))
                .values(
                    status=bindparam("status"), paused=bindparam("paused"),
                    position=bindparam("position"), attempt=bindparam("attempt"),
                    waiting=bindparam("waiting"), completed=bindparam("completed"),
                    data=bindparam("data"), reason=bindparam("reason"),
                    updated_at=bindparam("updated_at"), version=bindparam("version"),
                )
            )
            result = await conn.execute(statement, changed_rows)
            if 0 <= result.rowcount < len(changed_rows):
                raise ConcurrentUpdate(f"{len(changed_rows) - result.rowcount} sagas changed "
                                       "under this transaction")
        if fx.timeline:
            await conn.execute(saga_timeline.insert(), [_timeline_row(e) for e in fx.timeline])
        await self._write_timers(conn, fx.timers)
        await add_to_outbox(conn, fx.outgoing, now=self.clock())

    async def _write_timers(
        self, conn: AsyncConnection, timers: dict[tuple[str, str], Timer | None]
    ) -> None:
        to_set = [
            {"saga_id": saga_id, "kind": kind, "fire_at": t.fire_at, "step": t.step,
             "attempt": t.attempt}
            for (saga_id, kind), t in timers.items() if t is not None
        ]
        to_delete = [key for key, t in timers.items() if t is None]
        if to_delete:
            await conn.execute(
                delete(saga_timers).where(
                    tuple_(saga_timers.c.saga_id, saga_timers.c.kind).in_(to_delete)
                )
            )
        if to_set:
            dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
            statement = dialect.insert(saga_timers)
            statement = statement.on_conflict_do_update(
                index_elements=["saga_id", "kind"],
                set_={"fire_at": statement.excluded.fire_at, "step": statement.excluded.step,
                      "attempt": statement.excluded.attempt},
            )
            await conn.execute(statement, to_set)

    def _after_commit(self, fx: Effects) -> None:
        if fx.outgoing:
            self.relay.wake()
        self._after_commit_metrics(fx)

    @staticmethod
    def _after_commit_metrics(fx: Effects) -> None:
        for flow, before, after in fx.transitions:
            SAGA_TRANSITIONS.labels(flow, before or "new", after).inc()
        for flow, step, seconds in fx.latencies:
            STEP_LATENCY.labels(flow, step).observe(seconds)


def _timeline_row(entry: TimelineEntry) -> dict[str, Any]:
    return {"saga_id": entry.saga_id, "at": entry.at, "event": entry.event, "step": entry.step,
            "attempt": entry.attempt, "detail": entry.detail}
