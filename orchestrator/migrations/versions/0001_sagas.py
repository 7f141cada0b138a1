"""Outbox, inbox and the saga tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from infra.db.messaging import create_messaging_tables, drop_messaging_tables

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    create_messaging_tables()
    op.create_table(
        "sagas",
        sa.Column("saga_id", sa.String(100), primary_key=True),
        sa.Column("flow", sa.String(100), nullable=False),
        sa.Column("status", sa.String(30), nullable=False),
        sa.Column("paused", sa.Boolean, nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("waiting", sa.String(20), nullable=True),
        sa.Column("completed", sa.Text, nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_sagas_status", "sagas", ["status", "flow"])
    op.create_table(
        "saga_timeline",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("saga_id", sa.String(100), nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("event", sa.String(40), nullable=False),
        sa.Column("step", sa.String(64), nullable=True),
        sa.Column("attempt", sa.Integer, nullable=True),
        sa.Column("detail", sa.Text, nullable=True),
    )
    op.create_index("ix_saga_timeline_saga", "saga_timeline", ["saga_id", "id"])
    op.create_table(
        "saga_timers",
        sa.Column("saga_id", sa.String(100), primary_key=True),
        sa.Column("kind", sa.String(10), primary_key=True),
        sa.Column("fire_at", sa.Float, nullable=False),
        sa.Column("step", sa.String(64), nullable=True),
        sa.Column("attempt", sa.Integer, nullable=True),
    )
    op.create_index("ix_saga_timers_fire_at", "saga_timers", ["fire_at"])


def downgrade() -> None:
    op.drop_table("saga_timers")
    op.drop_table("saga_timeline")
    op.drop_table("sagas")
    drop_messaging_tables()
