"""The outbox and inbox tables every service with messages owns (one pair per service).

``outbox``: messages written in the same transaction as the state change that caused
them; the ``OutboxRelay`` publishes them afterwards and deletes them. ``inbox``: the
ids of messages already handled, inserted in the same transaction as their effect, so a
redelivered message is recognised and its effect not applied twice.

A service's first migration creates both with ``create_messaging_tables()``; that function
is frozen with the migrations that call it (a later change to these tables comes as a new
function called by a new migration).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

_ID = BigInteger().with_variant(Integer, "sqlite")  # SQLite: an alias of the rowid

outbox = Table(
    "outbox",
    metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("message_id", String(200), nullable=False, unique=True),
    Column("routing_key", String(255), nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("headers", Text, nullable=True),  # JSON object of str → str
    Column("created_at", Float, nullable=False),
    Column("retry_at", Float, nullable=True),  # set after a failed publish: not before
)

inbox = Table(
    "inbox",
    metadata,
    Column("message_id", String(200), primary_key=True),
    Column("received_at", Float, nullable=False),
)
Index("ix_inbox_received_at", inbox.c.received_at)


def create_messaging_tables() -> None:
    """Create ``outbox`` and ``inbox`` from inside an Alembic migration's ``upgrade()``."""
    from alembic import op

    op.create_table(
        "outbox",
        Column("id", _ID, primary_key=True, autoincrement=True),
        Column("message_id", String(200), nullable=False, unique=True),
        Column("routing_key", String(255), nullable=False),
        Column("body", LargeBinary, nullable=False),
        Column("headers", Text, nullable=True),
        Column("created_at", Float, nullable=False),
        Column("sent_at", Float, nullable=True),
        Column("retry_at", Float, nullable=True),
    )
    _create_sent_mark_indexes()
    op.create_table(
        "inbox",
        Column("message_id", String(200), primary_key=True),
        Column("received_at", Float, nullable=False),
    )
    op.create_index("ix_inbox_received_at", "inbox", ["received_at"])


def delete_sent_outbox_rows() -> None:
    """From inside a migration's ``upgrade()``: the relay deletes what it published, so
    the outbox holds only pending rows; the sent mark and its indexes go (marking a row
    rewrote it whole, message body included, on SQLite)."""
    from alembic import op

    op.execute("DELETE FROM outbox WHERE sent_at IS NOT NULL")
    op.drop_index("ix_outbox_sent_at", table_name="outbox")
    op.drop_index("ix_outbox_pending", table_name="outbox")
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("sent_at")


def restore_sent_outbox_marks() -> None:
    """``delete_sent_outbox_rows`` undone: every row left is pending."""
    from alembic import op

    with op.batch_alter_table("outbox") as batch:
        batch.add_column(Column("sent_at", Float, nullable=True))
    _create_sent_mark_indexes()


def _create_sent_mark_indexes() -> None:
    """The indexes of the outbox's sent mark (until ``delete_sent_outbox_rows``): only
    unsent rows, and the purge's sent time."""
    from alembic import op
    from sqlalchemy import column

    op.create_index(
        "ix_outbox_pending",
        "outbox",
        ["id"],
        sqlite_where=column("sent_at").is_(None),
        postgresql_where=column("sent_at").is_(None),
    )
    op.create_index("ix_outbox_sent_at", "outbox", ["sent_at"])


def drop_messaging_tables() -> None:
    from alembic import op

    op.drop_table("inbox")
    op.drop_table("outbox")
