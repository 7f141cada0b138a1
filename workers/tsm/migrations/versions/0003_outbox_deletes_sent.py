"""The outbox relay deletes what it published: the sent mark and its indexes go.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from infra.db.messaging import delete_sent_outbox_rows, restore_sent_outbox_marks

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    delete_sent_outbox_rows()


def downgrade() -> None:
    restore_sent_outbox_marks()
