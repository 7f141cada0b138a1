"""The outbox relay deletes what it published: the sent mark and its indexes go.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from __future__ import annotations

from infra.db.messaging import delete_sent_outbox_rows, restore_sent_outbox_marks

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    delete_sent_outbox_rows()


def downgrade() -> None:
    restore_sent_outbox_marks()
