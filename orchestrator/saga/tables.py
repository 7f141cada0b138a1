"""The orchestrator's saga tables (created by ``orchestrator/migrations``).

- ``sagas``: one row per saga: where it is (``position``, ``attempt``, ``waiting``), its
  data as JSON, ``status`` (running, compensating, completed, compensated,
  failed_needs_operator), ``paused``, the terminal ``reason`` and a ``version`` bumped by
  every change. Rows are changed under a row lock (PostgreSQL ``FOR UPDATE``, SQLite's
  write lock), in saga-id order so that two orchestrators never deadlock.
- ``saga_timeline``: every transition of every saga, with its time.
- ``saga_timers``: durable timers as data: at most one ``step`` timer (timeout or retry
  backoff of the current attempt) and one ``deadline`` timer per saga.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

_ID = BigInteger().with_variant(Integer, "sqlite")

sagas = Table(
    "sagas",
    metadata,
    Column("saga_id", String(100), primary_key=True),
    Column("flow", String(100), nullable=False),
    Column("status", String(30), nullable=False),
    Column("paused", Boolean, nullable=False, default=False),
    Column("position", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("waiting", String(20), nullable=True),
    Column("completed", Text, nullable=False),  # JSON list of step indices to undo
    Column("data", Text, nullable=False),
    Column("reason", Text, nullable=True),
    Column("version", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)
Index("ix_sagas_status", sagas.c.status, sagas.c.flow)

saga_timeline = Table(
    "saga_timeline",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("saga_id", String(100), nullable=False),
    Column("at", Float, nullable=False),
    Column("event", String(40), nullable=False),
    Column("step", String(64), nullable=True),
    Column("attempt", Integer, nullable=True),
    Column("detail", Text, nullable=True),
)
Index("ix_saga_timeline_saga", saga_timeline.c.saga_id, saga_timeline.c.id)

saga_timers = Table(
    "saga_timers",
    metadata,
    Column("saga_id", String(100), primary_key=True),
    Column("kind", String(10), primary_key=True),  # "step" | "deadline"
    Column("fire_at", Float, nullable=False),
    Column("step", String(64), nullable=True),
    Column("attempt", Integer, nullable=True),
)
Index("ix_saga_timers_fire_at", saga_timers.c.fire_at)
