"""The outbox migration of every service: sent rows go, pending rows stay, the sent mark
and its indexes are dropped (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text

from infra.db import Database
from infra.db.migrate import MIGRATIONS, upgrade

# the revision before the outbox lost its sent mark, per service
BEFORE = {"orchestrator": "0001", "demo_participant": "0001", "ca": "0001", "tsm": "0002"}


async def _migrate_with_sent_and_pending_rows(db: Database, service: str) -> None:
    await upgrade(db, service, revision=BEFORE[service])
    async with db.transaction() as conn:
        await conn.execute(text(
            "INSERT INTO outbox (message_id, routing_key, body, created_at, sent_at) VALUES "
            "('sent-1', 'k', :body, 1.0, 2.0), ('pending-1', 'k', :body, 1.0, NULL), "
            "('sent-2', 'k', :body, 1.0, 3.0)"
        ), {"body": b"{}"})
    await upgrade(db, service)
    async with db.transaction() as conn:
        ids = (await conn.execute(text("SELECT message_id FROM outbox"))).scalars().all()
        columns, indexes = await conn.run_sync(
            lambda sync: (
                {c["name"] for c in inspect(sync).get_columns("outbox")},
                {i["name"] for i in inspect(sync).get_indexes("outbox")},
            )
        )
    assert ids == ["pending-1"]
    assert "sent_at" not in columns and "retry_at" in columns
    assert not indexes & {"ix_outbox_pending", "ix_outbox_sent_at"}


def test_every_service_with_an_outbox_is_covered() -> None:
    assert set(BEFORE) == set(MIGRATIONS)


@pytest.mark.parametrize("service", sorted(BEFORE))
async def test_sqlite_outbox_keeps_only_pending_rows(tmp_path, service) -> None:
    db = Database.for_service(service, data_dir=tmp_path)
    try:
        await _migrate_with_sent_and_pending_rows(db, service)
    finally:
        await db.close()


@pytest.mark.postgres
@pytest.mark.parametrize("service", sorted(BEFORE))
async def test_postgresql_outbox_keeps_only_pending_rows(pg_url, unique, service) -> None:
    db = Database(pg_url, schema=f"outbox_{unique}")
    try:
        await _migrate_with_sent_and_pending_rows(db, service)
    finally:
        await db.drop_schema()
        await db.close()
