"""The outbox and inbox tables every service with messages owns (one pair per service).

``outbox``: messages written in the same transaction as the state change that caused
them; the ``OutboxRelay`` publishes them afterwards and marks them sent. ``inbox``: the
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
    Column("sent_at", Float, nullable=True),
    Column("retry_at", Float, nullable=True),  # set after a failed publish: not before
)
# Only unsent rows are indexed, so the relay's claim query stays small however many sent
# rows wait for purging.
Index(
    "ix_outbox_pending",
    outbox.c.id,
    sqlite_where=outbox.c.sent_at.is_(None),
    postgresql_where=outbox.c.sent_at.is_(None),
)
Index("ix_outbox_sent_at", outbox.c.sent_at)

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
    from sqlalchemy import column

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
    op.create_index(
        "ix_outbox_pending",
        "outbox",
        ["id"],
        sqlite_where=column("sent_at").is_(None),
        postgresql_where=column("sent_at").is_(None),
    )
    op.create_index("ix_outbox_sent_at", "outbox", ["sent_at"])
    op.create_table(
        "inbox",
        Column("message_id", String(200), primary_key=True),
        Column("received_at", Float, nullable=False),
    )
    op.create_index("ix_inbox_received_at", "inbox", ["received_at"])


def drop_messaging_tables() -> None:
    from alembic import op

    op.drop_table("inbox")
    op.drop_table("outbox")
