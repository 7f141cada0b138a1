"""Outbox, inbox, the secure-element registry and the operations record.

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
        "secure_elements",
        sa.Column("cin", sa.String(64), primary_key=True),
        sa.Column("kdd", sa.String(64), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=True),
        sa.Column("key_version", sa.Integer, nullable=False),
        sa.Column("pending_key_version", sa.Integer, nullable=True),
        sa.Column("sequence_counter", sa.Integer, nullable=False),
        sa.Column("challenge_mode", sa.String(20), nullable=False),
        sa.Column("applet_state", sa.String(20), nullable=False),
        sa.Column("holds_keys", sa.Boolean, nullable=False),
        sa.Column("owner_reference", sa.String(64), nullable=True),
        sa.Column("last_seen", sa.Float, nullable=True),
        sa.Column("pending_cleanup", sa.Boolean, nullable=False),
        sa.Column("sealed_temporary_pins", sa.LargeBinary, nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_secure_elements_device", "secure_elements", ["device_id"])
    op.create_index("ix_secure_elements_owner", "secure_elements", ["owner_reference"])
    op.create_table(
        "tsm_operations",
        sa.Column("command_id", sa.String(128), primary_key=True),
        sa.Column("cin", sa.String(64), nullable=False),
        sa.Column("operation", sa.String(32), nullable=False),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("reply", sa.LargeBinary, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_tsm_operations_cin", "tsm_operations", ["cin"])


def downgrade() -> None:
    op.drop_table("tsm_operations")
    op.drop_table("secure_elements")
    drop_messaging_tables()
