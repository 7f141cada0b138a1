"""The per-issuance statements as driver SQL (``workers.ca.hot_sql``), on SQLite and on
PostgreSQL: rows written by driver SQL read back through SQLAlchemy Core as they were
written, and the other way round, and the CA answers as before on both."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from ca_support import OTHER_SE, PASSPHRASE, T0, issue_card, key_request, make_person, verify
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from infra.db.database import Database
from infra.db.fast import execute, fetch
from workers.ca import Branch, CertificateAuthority, CertType, Status
from workers.ca import tables as t
from workers.ca.errors import (
    ApplicationNotVerified,
    CardCertificateExpired,
    CardCertificateRevoked,
    NonceReplayed,
    UnknownCardCertificate,
)
from workers.ca.hot_sql import INSERT_USED_NONCE, record_application, time_columns, utc
from workers.ca.profiles import Holder
from workers.ca.revocation import Cause

MOMENTS = [
    datetime(2026, 6, 1, 9, 0, 5, 123456, tzinfo=UTC),
    datetime(2031, 3, 31, 14, 59, 59, tzinfo=UTC),
    datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
]


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request, tmp_path, clock, keys) -> AsyncIterator[CertificateAuthority]:
    """A CA on SQLite, or on PostgreSQL in a schema of its own (skipped loudly, or failed
    with JPKI_REQUIRE_SERVICES=1, when PostgreSQL is not there)."""
    db = None
    if request.param == "postgresql":
        pg_url = request.getfixturevalue("pg_url")
        unique = request.getfixturevalue("unique")
        db = Database.for_service("ca", url=pg_url, schema=f"ca_hot_{unique}")
    ca = await CertificateAuthority.open(
        tmp_path / "ca", PASSPHRASE, db=db, clock=clock, random_bytes=os.urandom, new_key=keys
    )
    try:
        yield ca
    finally:
        await ca.close()
        if db is not None:
            await db.drop_schema()


@pytest.mark.parametrize("moment", MOMENTS)
async def test_a_time_written_by_driver_sql_reads_back_through_core(store, moment) -> None:
    async with store.database.transaction() as conn:
        write = time_columns(conn.dialect).write
        await execute(conn, INSERT_USED_NONCE, ("ab" * 16, "saga-1", "d" * 64, write(moment)))
        (stored,) = (await conn.execute(select(t.used_nonces.c.used_at))).scalars().all()
    assert utc(stored) == moment
    if conn.dialect.name == "postgresql":
        assert stored.tzinfo is not None


@pytest.mark.parametrize("moment", MOMENTS)
async def test_a_time_written_through_core_reads_back_through_driver_sql(store, moment) -> None:
    async with store.database.transaction() as conn:
        await conn.execute(
            insert(t.used_nonces).values(
                nonce="cd" * 16, saga_id="saga-1", application_digest="d" * 64, used_at=moment
            )
        )
        ((stored,),) = await fetch(conn, "SELECT used_at FROM ca_used_nonces")
        read = time_columns(conn.dialect).read(stored)
    assert read == moment
    assert read.tzinfo is not None


@pytest.mark.parametrize("moment", MOMENTS)
async def test_both_paths_store_a_time_alike(store, moment) -> None:
    """The same stored value, not only the same value read back: SQL compares and sorts
    the stored times (on SQLite, as text)."""
    async with store.database.transaction() as conn:
        write = time_columns(conn.dialect).write
        await execute(conn, INSERT_USED_NONCE, ("01" * 16, "saga-1", "d" * 64, write(moment)))
        await conn.execute(
            insert(t.used_nonces).values(
                nonce="02" * 16, saga_id="saga-2", application_digest="d" * 64, used_at=moment
            )
        )
        stored = await fetch(conn, "SELECT used_at FROM ca_used_nonces ORDER BY nonce")
    (by_driver,), (by_core,) = stored
    assert by_driver == by_core
    assert type(by_driver) is type(by_core)


def _application_row(saga_id: str, write) -> tuple:
    return (saga_id, "person-1", "CIN", "KDD", "0" * 40, "auth,sign", 4, "d" * 64, write(T0))


@pytest.mark.parametrize(
    ("second_nonce", "second_saga"),
    [("ef" * 16, "saga-2"), ("fe" * 16, "saga-1")],
    ids=["nonce-spent", "saga-recorded"],
)
async def test_recording_over_a_unique_key_is_an_integrity_error(
    store, second_nonce, second_saga
) -> None:
    """The CA relies on the unique keys of the nonce and of the saga's application,
    whichever driver runs the statements (on PostgreSQL, one statement for both)."""
    async with store.database.transaction() as conn:
        write = time_columns(conn.dialect).write
        await record_application(
            conn, ("ef" * 16, "saga-1", "d" * 64, write(T0)), _application_row("saga-1", write)
        )
        with pytest.raises(IntegrityError):
            await record_application(
                conn,
                (second_nonce, second_saga, "d" * 64, write(T0)),
                _application_row(second_saga, write),
            )


async def test_verification_and_issuance_rows_read_the_same_through_core(
    store, clock, keys
) -> None:
    card = await issue_card(store, keys)  # card certificates written through Core
    nonce = os.urandom(32)
    verified = await verify(store, card, "saga-1", nonce)
    assert await store.verified_application("saga-1") == verified
    async with store.database.transaction() as conn:
        used = (await conn.execute(select(t.used_nonces))).one()
        application = (await conn.execute(select(t.applications))).one()
    assert (used.nonce, used.saga_id) == (nonce.hex(), "saga-1")
    assert utc(used.used_at) == T0
    assert utc(application.verified_at) == T0
    assert application.card_serial == card.certs.sign.serial

    clock.advance(timedelta(seconds=1, microseconds=250))
    requests = [
        key_request("saga-1", CertType.AUTH, keys()),
        key_request("saga-1", CertType.SIGN, keys()),
    ]
    issued = await store.issue("saga-1", requests)
    records = {r.serial: r for r in await store.certificates(holder=Holder.PHONE)}
    for answer in issued:
        record = records[answer.serial]
        assert record.der == answer.der
        assert record.not_before == answer.certificate.not_valid_before_utc
        assert record.not_after == answer.not_after == card.certs.sign.not_after
        assert record.status_changed_at is None
    async with store.database.transaction() as conn:
        issued_at = (
            (
                await conn.execute(
                    select(t.certificates.c.issued_at).where(t.certificates.c.saga_id == "saga-1")
                )
            )
            .scalars()
            .all()
        )
    assert [utc(value) for value in issued_at] == [clock.now, clock.now]


async def test_verification_reads_the_card_times_core_wrote(store, clock, keys) -> None:
    """The card's not_after, written through Core, bounds verification to the microsecond."""
    card = await issue_card(store, keys, expiry=T0 + timedelta(days=30))
    not_after = (await store.certificate(card.certs.sign.serial)).not_after
    assert not_after == T0 + timedelta(days=30)
    clock.now = not_after - timedelta(microseconds=1)
    requested = clock.now.replace(microsecond=0)
    await verify(store, card, "saga-1", os.urandom(32), requested_at=requested)
    clock.now = not_after
    with pytest.raises(CardCertificateExpired):
        await verify(store, card, "saga-2", os.urandom(32), requested_at=requested)


async def test_verification_answers_as_before(store, keys) -> None:
    card = await issue_card(store, keys)
    nonce = os.urandom(32)
    first = await verify(store, card, "saga-1", nonce)
    assert await verify(store, card, "saga-1", nonce) == first  # a redelivery
    with pytest.raises(NonceReplayed):
        await verify(store, card, "saga-2", nonce)  # the nonce is spent
    with pytest.raises(NonceReplayed):
        await verify(store, card, "saga-1", os.urandom(32))  # the saga has its application
    other = await issue_card(store, keys, make_person("person-0002"))
    other_card_der = other.certs.sign.der
    await store.revoke(other.certs.sign.serial, Cause.CARD_FACTS_CHANGED)
    with pytest.raises(CardCertificateRevoked):
        await verify(store, other, "saga-3", os.urandom(32))
    async with store.database.transaction() as conn:
        await conn.execute(t.certificates.delete().where(t.certificates.c.der == other_card_der))
    with pytest.raises(UnknownCardCertificate):
        await verify(store, other, "saga-4", os.urandom(32))


async def test_state_check_reads_the_branches(store, clock, keys) -> None:
    with pytest.raises(ApplicationNotVerified):
        await store.state_check("saga-1")
    card = await issue_card(store, keys)
    await verify(store, card, "saga-1", os.urandom(32))
    assert (await store.state_check("saga-1")).branch is Branch.NEW_ISSUANCE
    pair = [
        key_request("saga-1", CertType.AUTH, keys()),
        key_request("saga-1", CertType.SIGN, keys()),
    ]
    issued = await store.issue("saga-1", pair)
    # the saga's own certificates do not count for itself
    assert (await store.state_check("saga-1")).branch is Branch.NEW_ISSUANCE

    await verify(store, card, "saga-2", os.urandom(32), se=OTHER_SE, expected_se=OTHER_SE)
    moved = await store.state_check("saga-2")
    assert moved.branch is Branch.MODEL_CHANGE
    assert set(moved.revoke_after_success) == {c.serial for c in issued}

    await store.hold(issued[0].serial)
    await verify(store, card, "saga-3", os.urandom(32))
    found = await store.state_check("saga-3")
    assert (found.branch, found.release, found.revoke_now) == (
        Branch.FOUND_ON_SAME_SE,
        (issued[0].serial,),
        (issued[1].serial,),
    )
    await store.revoke(card.certs.sign.serial, Cause.CARD_FACTS_CHANGED)
    assert (await store.state_check("saga-3")).branch is Branch.RENEW_CARD_FIRST
    statuses = {r.serial: r.status for r in await store.certificates(holder=Holder.PHONE)}
    assert statuses == {issued[0].serial: Status.HELD, issued[1].serial: Status.REVOKED}
