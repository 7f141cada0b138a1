"""Outbox, inbox and the demo participant's effect log.

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


def upgrade() -> None:
    create_messaging_tables()
    op.create_table(
        "demo_effects",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("saga_id", sa.String(100), nullable=False),
        sa.Column("step", sa.String(64), nullable=False),
        sa.Column("action", sa.String(10), nullable=False),
        sa.Column("message_id", sa.String(200), nullable=False),
        sa.Column("applied_at", sa.Float, nullable=False),
    )
    op.create_index("ix_demo_effects_saga", "demo_effects", ["saga_id", "step"])


def downgrade() -> None:
    op.drop_table("demo_effects")
    drop_messaging_tables()
