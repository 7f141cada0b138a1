"""Operations that wait for a phone: the script they wait for and their sealed state.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tsm_operations") as batch:
        batch.add_column(sa.Column("script_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("state", sa.LargeBinary, nullable=True))
        batch.create_index("ix_tsm_operations_script", ["script_id"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("tsm_operations") as batch:
        batch.drop_index("ix_tsm_operations_script")
        batch.drop_column("state")
        batch.drop_column("script_id")
