"""Phone issuance as the hot path runs it: certificates from an ``EndEntityTemplate`` (the
same bytes as pyca's builder), signed with no transaction open, checked again when stored."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta

import pytest
from ca_support import SigningGate, issue_card, key_request, make_person, verify
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from workers.ca import Cause, CertType
from workers.ca.errors import CardCertificateRevoked, UntrustedCardCertificate
from workers.ca.profiles import (
    CaKind,
    CaNames,
    Holder,
    Issuer,
    auth_subject,
    auth_subject_rdns,
    basic_facts_san,
    build_ca_certificate,
    build_end_entity,
    end_entity_template,
    sign_subject,
    sign_subject_rdns,
)


@pytest.mark.parametrize("cert_type", [CertType.AUTH, CertType.SIGN])
@pytest.mark.parametrize(
    ("serial", "not_before", "not_after"),
    [
        # a serial whose top bit is set needs a leading zero octet; times carry microseconds
        (
            (1 << 159) - 12345,
            datetime(2026, 6, 1, 9, 0, 5, 123456, tzinfo=UTC),
            datetime(2031, 3, 31, 14, 59, 59, 999999, tzinfo=UTC),
        ),
        # GeneralizedTime from 2050 on (RFC 5280 §4.1.2.5); a one-octet serial
        (0x7F, datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC), datetime(2050, 1, 1, tzinfo=UTC)),
    ],
)
def test_template_matches_the_certificate_builder_byte_for_byte(
    keys, cert_type, serial, not_before, not_after
) -> None:
    ca_key, subject_key = keys(), keys()
    kind = CaKind(cert_type.value)
    issuer = Issuer(
        kind=kind,
        generation=3,
        certificate=build_ca_certificate(
            name=CaNames().for_kind(kind),
            key=ca_key,
            serial=99,
            not_before=not_before - timedelta(days=1),
            not_after=not_after + timedelta(days=1),
        ),
        key=ca_key,
    )
    person = make_person()
    san = basic_facts_san(person.facts) if cert_type is CertType.SIGN else None
    if cert_type is CertType.SIGN:
        subject = sign_subject(person.prefecture, person.city, "0123456789ABCDEF01234567")
        rdns = sign_subject_rdns(person.prefecture, person.city)
    else:
        subject, rdns = auth_subject("0123456789ABCDEF01234567"), auth_subject_rdns()
    reference = build_end_entity(
        issuer=issuer,
        cert_type=cert_type,
        subject=subject,
        public_key=subject_key.public_key(),
        serial=serial,
        not_before=not_before,
        not_after=not_after,
        facts=None,
        subject_alt_name=san,
    ).public_bytes(serialization.Encoding.DER)
    template = end_entity_template(issuer, cert_type, rdns, subject_alt_name=san)
    der = template.issue(
        public_key=subject_key.public_key(),
        serial=serial,
        common_name="0123456789ABCDEF01234567",
        not_before=not_before,
        not_after=not_after,
    )
    assert der == reference


async def _store_is_free(ca) -> None:
    """A transaction of our own starts and commits at once (SQLite has one connection)."""
    async with asyncio.timeout(5):
        async with ca.database.transaction() as conn:
            await conn.exec_driver_sql("SELECT 1")


def _pair(saga_id: str, keys):
    return [
        key_request(saga_id, CertType.AUTH, keys()),
        key_request(saga_id, CertType.SIGN, keys()),
    ]


async def test_issuance_signs_with_no_transaction_open(ca, keys, monkeypatch) -> None:
    card = await issue_card(ca, keys)
    await verify(ca, card, "saga-1", os.urandom(32))
    gate = SigningGate(monkeypatch)
    issuing = asyncio.create_task(ca.issue("saga-1", _pair("saga-1", keys)))
    try:
        await gate.signing()
        await _store_is_free(ca)
    finally:
        gate.open()
    issued = await issuing
    assert [i.cert_type for i in issued] == [CertType.AUTH, CertType.SIGN]
    stored = {r.serial: r for r in await ca.certificates(holder=Holder.PHONE)}
    assert set(stored) == {i.serial for i in issued}
    for answer in issued:
        record = stored[answer.serial]
        assert record.der == answer.der
        certificate = x509.load_der_x509_certificate(answer.der)
        assert record.not_before == certificate.not_valid_before_utc
        assert record.not_after == certificate.not_valid_after_utc == answer.not_after


async def test_a_card_revoked_while_signing_stops_the_issuance(ca, keys, monkeypatch) -> None:
    card = await issue_card(ca, keys)
    await verify(ca, card, "saga-1", os.urandom(32))
    gate = SigningGate(monkeypatch)
    issuing = asyncio.create_task(ca.issue("saga-1", _pair("saga-1", keys)))
    try:
        await gate.signing()
        await ca.revoke(card.certs.sign.serial, Cause.CARD_FACTS_CHANGED)
    finally:
        gate.open()
    with pytest.raises(CardCertificateRevoked):
        await issuing
    assert await ca.certificates(holder=Holder.PHONE) == []


async def test_concurrent_duplicates_answer_one_stored_pair(ca, keys, monkeypatch) -> None:
    card = await issue_card(ca, keys)
    await verify(ca, card, "saga-1", os.urandom(32))
    pair = _pair("saga-1", keys)
    plans: list[object] = []
    both_planned = asyncio.Event()
    plan_issue = ca.plan_issue

    async def counted(*args, **kwargs):
        plans.append(await plan_issue(*args, **kwargs))
        if len(plans) == 2:
            both_planned.set()
        return plans[-1]

    monkeypatch.setattr(ca, "plan_issue", counted)
    gate = SigningGate(monkeypatch)
    first = asyncio.create_task(ca.issue("saga-1", pair))
    second = asyncio.create_task(ca.issue("saga-1", pair))
    try:
        async with asyncio.timeout(10):
            await both_planned.wait()  # both planned to sign before either stored
    finally:
        gate.open()
    one, two = await first, await second
    assert [c.der for c in one] == [c.der for c in two]
    stored = await ca.certificates(holder=Holder.PHONE)
    assert sorted(r.serial for r in stored) == sorted(c.serial for c in one)


async def test_a_remembered_card_chain_does_not_vouch_for_a_forged_card(ca, keys) -> None:
    card = await issue_card(ca, keys)
    await verify(ca, card, "saga-1", os.urandom(32))  # the genuine chain is now remembered
    genuine = ca.issuer(CaKind.SIGN)
    impostor = Issuer(
        kind=CaKind.SIGN, generation=genuine.generation, certificate=genuine.certificate, key=keys()
    )
    genuine_card = card.certs.sign.certificate
    forged = build_end_entity(
        issuer=impostor,  # names our CA's key id, signed by another key
        cert_type=CertType.SIGN,
        subject=genuine_card.subject,
        public_key=card.sign_key.public_key(),
        serial=genuine_card.serial_number,
        not_before=genuine_card.not_valid_before_utc,
        not_after=genuine_card.not_valid_after_utc,
        facts=card.person.facts,
    )
    forged_card = type(card)(
        card.person,
        card.auth_key,
        card.sign_key,
        type(card.certs)(
            person_id=card.certs.person_id,
            auth=card.certs.auth,
            sign=type(card.certs.sign)(
                serial=card.certs.sign.serial,
                cert_type=CertType.SIGN,
                der=forged.public_bytes(serialization.Encoding.DER),
                not_after=card.certs.sign.not_after,
                ca_der=card.certs.sign.ca_der,
            ),
            revoked_previous=(),
        ),
    )
    with pytest.raises(UntrustedCardCertificate):
        await verify(ca, forged_card, "saga-2", os.urandom(32))
