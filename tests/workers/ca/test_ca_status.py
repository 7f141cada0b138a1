"""Statuses and reasons, the card cascade, CRL numbering and the encrypted CA key files."""

from __future__ import annotations

import os
import stat
from datetime import timedelta

import pytest
from ca_support import PASSPHRASE, issue_card, key_request, make_person, verify
from cryptography import x509

from workers.ca import CaKind, Cause, CertificateAuthority, CertType, Passphrase, Status
from workers.ca.errors import (
    CaKeyUnavailable,
    CertificateNotFound,
    InvalidRequest,
    InvalidTransition,
)
from workers.ca.profiles import Holder


async def _phone(ca, keys, card, saga_id: str = "saga-1"):
    await verify(ca, card, saga_id, os.urandom(32))
    return await ca.issue(
        saga_id,
        [key_request(saga_id, CertType.AUTH, keys()), key_request(saga_id, CertType.SIGN, keys())],
    )


async def test_hold_release_revoke(ca, keys) -> None:
    card = await issue_card(ca, keys)
    auth, sign = await _phone(ca, keys, card)
    with pytest.raises(InvalidTransition):
        await ca.release(auth.serial)  # only held certificates can be released
    (held,) = await ca.hold(auth.serial)
    assert (held.status, held.reason, held.changed) == (Status.HELD, "certificate_hold", True)
    (again,) = await ca.hold(auth.serial)
    assert not again.changed
    (released,) = await ca.release(auth.serial)
    assert released.status is Status.VALID and released.reason is None
    (repeat,) = await ca.release(auth.serial)  # a repeated release is answered, not refused
    assert not repeat.changed
    await ca.hold(auth.serial)
    (revoked,) = await ca.revoke(auth.serial, Cause.NOT_FOUND)  # held → revoked
    assert (revoked.status, revoked.reason) == (Status.REVOKED, "key_compromise")
    for attempt in (ca.hold(auth.serial), ca.release(auth.serial)):
        with pytest.raises(InvalidTransition):
            await attempt
    (same,) = await ca.revoke(auth.serial, Cause.LOSS)
    assert not same.changed and same.reason == "key_compromise"
    with pytest.raises(InvalidRequest):
        await ca.hold(sign.serial, Cause.LOSS)  # loss revokes; only temporary loss holds
    with pytest.raises(InvalidRequest):
        await ca.revoke(sign.serial, Cause.TEMPORARY_LOSS)
    with pytest.raises(CertificateNotFound):
        await ca.revoke("AB" * 20, Cause.LOSS)


@pytest.mark.parametrize(
    ("cause", "reason"),
    [
        (Cause.MODEL_CHANGE, x509.ReasonFlags.superseded),
        (Cause.REISSUE, x509.ReasonFlags.superseded),
        (Cause.LOSS, x509.ReasonFlags.key_compromise),
        (Cause.DISPOSAL, x509.ReasonFlags.cessation_of_operation),
        (Cause.FAILURE, x509.ReasonFlags.cessation_of_operation),
        (Cause.FOREIGN_APPLET, x509.ReasonFlags.key_compromise),
        (Cause.COMPENSATION, x509.ReasonFlags.cessation_of_operation),
    ],
)
async def test_revocation_reason_fits_the_cause(ca, keys, cause, reason) -> None:
    card = await issue_card(ca, keys)
    auth, _ = await _phone(ca, keys, card)
    await ca.revoke(auth.serial, cause)
    crl = x509.load_der_x509_crl(await ca.crl(CaKind.AUTH))
    entry = crl.get_revoked_certificate_by_serial_number(int(auth.serial, 16))
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is reason


async def test_card_signing_revocation_cascades_to_the_phone_signing_certificate(ca, keys) -> None:
    card = await issue_card(ca, keys)
    auth, sign = await _phone(ca, keys, card)
    changes = await ca.revoke(card.certs.sign.serial, Cause.CARD_FACTS_CHANGED)  # a move
    assert {(c.serial, c.holder, c.reason) for c in changes} == {
        (card.certs.sign.serial, Holder.CARD, "affiliation_changed"),
        (sign.serial, Holder.PHONE, "affiliation_changed"),
    }
    assert (await ca.certificate(auth.serial)).status is Status.VALID  # survives an address change
    assert (await ca.certificate(card.certs.auth.serial)).status is Status.VALID


async def test_card_renewal_revokes_both_phone_certificates(ca, keys) -> None:
    card = await issue_card(ca, keys)
    auth, sign = await _phone(ca, keys, card)
    other = await issue_card(ca, keys, make_person("person-0002"))
    other_auth, _ = await _phone(ca, keys, other, "saga-2")
    renewed = await issue_card(ca, keys, make_person())
    assert set(renewed.certs.revoked_previous) == {
        card.certs.auth.serial,
        card.certs.sign.serial,
        auth.serial,
        sign.serial,
    }
    for serial in (auth.serial, sign.serial):
        record = await ca.certificate(serial)
        assert (record.status, record.reason, record.cause) == (
            Status.REVOKED,
            "superseded",
            "card_renewed",
        )
    assert (await ca.certificate(other_auth.serial)).status is Status.VALID
    assert (await ca.certificate(renewed.certs.sign.serial)).status is Status.VALID


async def test_bulk_status_change_by_se_and_person(ca, keys) -> None:
    card = await issue_card(ca, keys)
    auth, sign = await _phone(ca, keys, card)
    held = await ca.change_status_of(Status.HELD, Cause.TEMPORARY_LOSS, se_cin=auth_se(ca))
    assert {c.serial for c in held} == {auth.serial, sign.serial}
    released = await ca.change_status_of(
        Status.VALID, Cause.FOUND, person_id=card.person.person_id, cert_types=[CertType.AUTH]
    )
    assert [c.serial for c in released] == [auth.serial]
    with pytest.raises(InvalidRequest):
        await ca.change_status_of(Status.REVOKED, Cause.LOSS)


def auth_se(ca) -> str:
    from ca_support import SE

    return SE.cin


async def test_crl_numbers_grow_and_released_entries_leave(ca, keys, clock) -> None:
    card = await issue_card(ca, keys)
    auth, _ = await _phone(ca, keys, card)

    def number(der: bytes) -> int:
        return (
            x509.load_der_x509_crl(der)
            .extensions.get_extension_for_class(x509.CRLNumber)
            .value.crl_number
        )

    first = await ca.crl(CaKind.AUTH)
    assert await ca.crl(CaKind.AUTH) == first  # nothing changed: the same CRL
    await ca.hold(auth.serial)
    second = await ca.crl(CaKind.AUTH)
    assert number(second) == number(first) + 1
    assert x509.load_der_x509_crl(second).get_revoked_certificate_by_serial_number(
        int(auth.serial, 16)
    )
    await ca.release(auth.serial)
    third = await ca.crl(CaKind.AUTH)
    assert number(third) == number(second) + 1
    assert (
        x509.load_der_x509_crl(third).get_revoked_certificate_by_serial_number(int(auth.serial, 16))
        is None
    )
    clock.advance(timedelta(hours=13))  # past half its life: a fresh one
    fourth = x509.load_der_x509_crl(await ca.crl(CaKind.AUTH))
    assert (
        fourth.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        == number(third) + 1
    )
    assert fourth.next_update_utc - fourth.last_update_utc == timedelta(hours=24)


async def test_ca_keys_live_encrypted_and_need_the_passphrase(tmp_path, clock, keys) -> None:
    ca = await CertificateAuthority.open(tmp_path / "d", PASSPHRASE, clock=clock, new_key=keys)
    key_ids = {i.kind: i.key_id for i in ca.generations()}
    assert "test-only" not in repr(ca) and "redacted" in repr(ca.issuer(CaKind.AUTH))
    assert "test-only" not in repr(PASSPHRASE)
    await ca.close()
    files = sorted((tmp_path / "d" / "keys").iterdir())
    assert len(files) == 2
    for path in files:
        assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(CaKeyUnavailable) as refused:
        await CertificateAuthority.open(tmp_path / "d", Passphrase(b"not the passphrase"))
    assert "not the passphrase" not in str(refused.value)
    reopened = await CertificateAuthority.open(tmp_path / "d", PASSPHRASE, clock=clock)
    assert {i.kind: i.key_id for i in reopened.generations()} == key_ids
    await reopened.close()


def test_passphrase_from_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("JPKI_CA_PASSPHRASE", raising=False)
    monkeypatch.delenv("JPKI_CA_PASSPHRASE_FILE", raising=False)
    with pytest.raises(CaKeyUnavailable):
        Passphrase.from_environment()
    secret = tmp_path / "secret"
    secret.write_bytes(b"from a mounted secret\n")
    monkeypatch.setenv("JPKI_CA_PASSPHRASE_FILE", str(secret))
    assert Passphrase.from_environment().value == b"from a mounted secret"
    with pytest.raises(CaKeyUnavailable):
        Passphrase(b"short")
