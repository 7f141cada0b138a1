"""Storage for every service: SQLAlchemy 2 async, SQLite by default, PostgreSQL by URL.

Usage::

    from infra.db import Database, upgrade, OutboxRelay, InboxConsumer, outgoing

    db = Database.for_service("ca", url=None, data_dir="data")  # data/ca.db (WAL)
    db = Database.for_service("ca", url="postgresql+asyncpg://u@h/db")  # schema "ca"
    await upgrade(db, "ca")                       # Alembic, the service's own history

    async with db.transaction() as conn:          # Core AsyncConnection; commit or rollback
        await conn.execute(my_table.insert(), rows)
        await add_to_outbox(conn, [outgoing(build(Reply(...), saga_id=...))])

    relay = OutboxRelay(db, transport)            # publishes committed outbox rows
    await relay.start()

    async def handle(conn, messages):             # one transaction for the whole batch
        out = []
        for m in messages:                        # each message id seen for the first time
            ...                                   # the effect, on conn
            out.append(outgoing(build(Reply(...), saga_id=m.envelope.saga_id,
                                      causation_id=m.envelope.message_id)))
        return out

    consumer = InboxConsumer(db, transport, "ca", handle, relay=relay)
    await consumer.start()

or, for one message, ``await handle_idempotently(db, message, effect, relay=relay)``.

Adding a service's tables (E: ``workers/ca``, F: ``workers/tsm``; already registered in
``infra.db.migrate.MIGRATIONS``):

1. create ``workers/ca/migrations/`` with ``__init__.py`` (empty), ``env.py`` (copy
   ``orchestrator/migrations/env.py``: two lines), ``script.py.mako`` (copy) and
   ``versions/``;
2. ``python -m infra.db revision ca -m "certificates"`` writes
   ``versions/<id>_certificates.py``; in its ``upgrade()`` call
   ``infra.db.messaging.create_messaging_tables()`` (outbox + inbox) in the *first*
   migration, then ``op.create_table(...)`` your tables;
3. declare the same tables as SQLAlchemy Core ``Table`` objects in your service for
   queries, and call ``await upgrade(db, "ca")`` at start-up and in test fixtures.
"""

from infra.db.database import Database, DatabaseConfigError, sqlite_url
from infra.db.inbox import InboxConsumer, claim_inbox, handle_idempotently
from infra.db.migrate import upgrade
from infra.db.outbox import OutboxRelay, add_to_outbox, outgoing, to_device

__all__ = [
    "Database",
    "DatabaseConfigError",
    "InboxConsumer",
    "OutboxRelay",
    "add_to_outbox",
    "claim_inbox",
    "handle_idempotently",
    "outgoing",
    "sqlite_url",
    "to_device",
    "upgrade",
]
