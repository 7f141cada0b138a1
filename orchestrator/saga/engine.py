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
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from infra.db.database import Database
from infra.db.fast import chunks, execute_many, fetch, in_list
from infra.db.inbox import InboxConsumer
from infra.db.outbox import OutboxRelay, add_to_outbox
from infra.metrics import SAGA_TRANSITIONS, SAGAS, STEP_SECONDS
from infra.transport.base import Outgoing, Transport
from orchestrator.saga.flow import Flow, FlowRegistry
from orchestrator.saga.machine import (
    STATUSES,
    Effects,
    Machine,
    SagaState,
    Timer,
)
from orchestrator.saga.tables import saga_timeline, saga_timers, sagas
from protocol.envelope import Message
from protocol.errors import Disposition, JpkiError

log = structlog.get_logger(__name__)

_SELECT_SAGAS = (
    "SELECT saga_id, flow, status, paused, position, attempt, waiting, completed, data, "
    "reason, version, created_at, updated_at FROM sagas"
)
_INSERT_SAGA = (
    "INSERT INTO sagas (saga_id, flow, status, paused, position, attempt, waiting, completed, "
    "data, reason, version, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# the version in the WHERE: a saga changed by someone else since we read it is not
# overwritten (the batch fails and is retried)
_UPDATE_SAGA = (
    "UPDATE sagas SET status = ?, paused = ?, position = ?, attempt = ?, waiting = ?, "
    "completed = ?, data = ?, reason = ?, version = ?, updated_at = ? "
    "WHERE saga_id = ? AND version = ?"
)
_INSERT_TIMELINE = (
    "INSERT INTO saga_timeline (saga_id, at, event, step, attempt, detail) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_DELETE_TIMER = "DELETE FROM saga_timers WHERE saga_id = ? AND kind = ?"
_UPSERT_TIMER = (
    "INSERT INTO saga_timers (saga_id, kind, fire_at, step, attempt) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (saga_id, kind) DO UPDATE SET fire_at = excluded.fire_at, "
    "step = excluded.step, attempt = excluded.attempt"
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
        timer_interval: float = 0.05,
        timer_full_poll: float = 1.0,
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
        self._metric_children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._gauge_interval = 5.0
        self._timer_full_poll = timer_full_poll
        self._next_timer = 0.0  # earliest fire_at known here: poll at start
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
        # the consumer writes fx.outgoing to the outbox in this transaction and hands it
        # to the relay after the commit
        await self._persist(conn, list(touched.values()), fx, outbox=False)
        self._after_commit_metrics(fx)
        return fx.outgoing

    @staticmethod
    def _is_reply(message: Message) -> bool:
        return message.envelope.causation_id is not None and ":" in message.envelope.causation_id

    # -- timers ----------------------------------------------------------------------------
    async def _timer_loop(self) -> None:
        # Poll when the earliest timer this process knows of is due, and at least every
        # ``timer_full_poll`` seconds for timers other orchestrators (or a crash) left.
        last_full = last_gauge = 0.0
        while True:
            try:
                now = self.clock()
                if now >= self._next_timer or now - last_full >= self._timer_full_poll:
                    last_full = now
                    while await self.fire_due_timers() > 0:
                        pass
                    self._next_timer = await self._earliest_timer()
                if now - last_gauge >= self._gauge_interval:
                    last_gauge = now
                    await self.refresh_saga_gauge()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("saga_timer_poll_failed", queue=self.queue)
            await asyncio.sleep(self._timer_interval)

    async def _earliest_timer(self) -> float:
        async with self.db.transaction() as conn:
            earliest = (await conn.execute(select(func.min(saga_timers.c.fire_at)))).scalar()
        return float("inf") if earliest is None else float(earliest)

    async def fire_due_timers(self, limit: int = 256) -> int:
        """Fire the timers due by the clock's now; returns for how many sagas."""
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
        # timers of sagas another transaction holds stay due for the next poll
        return len(touched)

    # -- persistence -----------------------------------------------------------------------
    async def _load(
        self, conn: AsyncConnection, saga_ids: Sequence[str], *, lock: bool = True,
        skip_locked: bool = False,
    ) -> dict[str, SagaState]:
        states: dict[str, SagaState] = {}
        suffix = ""
        if lock and self.db.is_postgres:
            suffix = " FOR UPDATE SKIP LOCKED" if skip_locked else " FOR UPDATE"
        for chunk in chunks(sorted(saga_ids), 500):
            sql = f"{_SELECT_SAGAS} WHERE saga_id IN {in_list(len(chunk))} ORDER BY saga_id{suffix}"
            for row in await fetch(conn, sql, tuple(chunk)):
                (saga_id, flow_name, status, paused, position, attempt, waiting, completed,
                 data, reason, version, created_at, updated_at) = row
                flow = self.registry.flows.get(flow_name)
                if flow is None:
                    log.warning("saga_of_unknown_flow", saga_id=saga_id, flow=flow_name)
                    continue
                states[saga_id] = SagaState(
                    saga_id=saga_id, flow=flow, status=status, paused=bool(paused),
                    position=position, attempt=attempt, waiting=waiting,
                    completed=_completed_decoder.decode(completed),
                    data=flow.decode_data(data), reason=reason, version=version,
                    created_at=created_at, updated_at=updated_at,
                )
        return states

    async def _persist(
        self, conn: AsyncConnection, states: Sequence[SagaState], fx: Effects, *,
        outbox: bool = True,
    ) -> None:
        new_rows: list[tuple[Any, ...]] = []
        changed_rows: list[tuple[Any, ...]] = []
        for state in states:
            if not state.changed:
                continue
            completed = _completed_encoder.encode(state.completed).decode()
            data = state.flow.encode_data(state.data).decode()
            if state.is_new:
                new_rows.append((
                    state.saga_id, state.flow.name, state.status, state.paused, state.position,
                    state.attempt, state.waiting, completed, data, state.reason, 1,
                    state.created_at, state.updated_at,
                ))
            else:
                changed_rows.append((
                    state.status, state.paused, state.position, state.attempt, state.waiting,
                    completed, data, state.reason, state.version + 1, state.updated_at,
                    state.saga_id, state.version,
                ))
        await execute_many(conn, _INSERT_SAGA, new_rows)
        changed = await execute_many(conn, _UPDATE_SAGA, changed_rows)
        if 0 <= changed < len(changed_rows):
            raise ConcurrentUpdate(f"{len(changed_rows) - changed} sagas changed under this "
                                   "transaction")
        await execute_many(conn, _INSERT_TIMELINE, [
            (e.saga_id, e.at, e.event, e.step, e.attempt, e.detail) for e in fx.timeline
        ])
        await self._write_timers(conn, fx.timers)
        if outbox:
            await add_to_outbox(conn, fx.outgoing, now=self.clock())

    async def _write_timers(
        self, conn: AsyncConnection, timers: dict[tuple[str, str], Timer | None]
    ) -> None:
        to_set = [
            (saga_id, kind, t.fire_at, t.step, t.attempt)
            for (saga_id, kind), t in timers.items() if t is not None
        ]
        await execute_many(conn, _DELETE_TIMER, [key for key, t in timers.items() if t is None])
        if to_set:
            self._next_timer = min(self._next_timer, min(row[2] for row in to_set))
            await execute_many(conn, _UPSERT_TIMER, to_set)

    def _after_commit(self, fx: Effects) -> None:
        self.relay.handoff(fx.outgoing)
        self._after_commit_metrics(fx)

    def _after_commit_metrics(self, fx: Effects) -> None:
        for flow, _before, after in fx.transitions:
            self._metric(SAGA_TRANSITIONS, flow, after).inc()
        for flow, step, outcome, seconds in fx.latencies:
            self._metric(STEP_SECONDS, flow, step, outcome).observe(seconds)

    def _metric(self, metric: Any, *labels: str) -> Any:
        """The labelled child, kept: prometheus_client's labels() takes a lock and checks
        every label on each call."""
        child = self._metric_children.get((metric, labels))
        if child is None:
            child = self._metric_children[(metric, labels)] = metric.labels(*labels)
        return child

    async def refresh_saga_gauge(self) -> None:
        """Set ``jpki_sagas{saga_type, state}`` from the store."""
        query = select(sagas.c.flow, sagas.c.status, func.count()).group_by(
            sagas.c.flow, sagas.c.status
        )
        async with self.db.transaction() as conn:
            rows = (await conn.execute(query)).all()
        found = {(flow, status): n for flow, status, n in rows}
        for flow in self.registry.flows:
            for status in STATUSES:
                SAGAS.labels(flow, status).set(found.get((flow, status), 0))
