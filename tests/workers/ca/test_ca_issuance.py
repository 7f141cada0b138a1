"""Card certificates, card-signed applications, the phase-3 state check and phone issuance."""

from __future__ import annotations

import dataclasses
import os
from datetime import UTC, date, datetime, timedelta

import pytest
from ca_support import (
    OTHER_SE,
    SE,
    T0,
    application,
    card_sign,
    issue_card,
    key_request,
    make_person,
    spki,
    verify,
)
from cryptography import x509
from cryptography.x509.oid import NameOID

from workers.ca import Branch, Cause, CertType, Status
from workers.ca.errors import (
    ApplicationNotVerified,
    CaErrorCode,
    CardCertificateExpired,
    CardCertificateRevoked,
    ForgedSignature,
    InvalidPublicKey,
    InvalidRequest,
    NonceExpired,
    NonceReplayed,
    NonceUnknown,
    ProofOfPossessionFailed,
    UnknownCardCertificate,
    WrongSecureElement,
)
from workers.ca.profiles import (
    OID_BASIC_FACT_ADDRESS,
    OID_BASIC_FACT_DATE_OF_BIRTH,
    OID_BASIC_FACT_NAME,
    OID_BASIC_FACT_SEX,
    OID_POLICY_AUTHENTICATION,
    OID_POLICY_SIGNING,
    Holder,
    authority_key_identifier,
    jpki_date_of_birth,
    key_identifier,
    read_basic_facts,
)


def _ext(cert: x509.Certificate, cls):
    return cert.extensions.get_extension_for_class(cls)


async def _issue_both(ca, keys, card, saga_id: str, se=SE):
    nonce = os.urandom(32)
    await verify(ca, card, saga_id, nonce, se=se, expected_se=se)
    return await ca.issue(
        saga_id,
        [key_request(saga_id, CertType.AUTH, keys()), key_request(saga_id, CertType.SIGN, keys())],
    )


def test_date_of_birth_carries_the_era() -> None:
    assert jpki_date_of_birth(date(1985, 4, 1)) == "319850401"  # Showa
    assert jpki_date_of_birth(date(1989, 1, 8)) == "419890108"  # first day of Heisei
    assert jpki_date_of_birth(date(2019, 5, 1)) == "520190501"  # first day of Reiwa


async def test_card_certificates_follow_the_profiles(ca, keys) -> None:
    card = await issue_card(ca, keys)
    auth, sign = card.certs.auth.certificate, card.certs.sign.certificate
    # DOMAIN §2: card certificates run to the 5th birthday after issue (1 April 2031 here)
    assert auth.not_valid_after_utc == sign.not_valid_after_utc == datetime(2031, 4, 1, tzinfo=UTC)
    assert [a.oid for a in auth.subject] == [NameOID.COUNTRY_NAME, NameOID.COMMON_NAME]
    assert [a.oid for a in sign.subject] == [
        NameOID.COUNTRY_NAME,
        NameOID.LOCALITY_NAME,
        NameOID.LOCALITY_NAME,
        NameOID.COMMON_NAME,
    ]
    auth_ku, sign_ku = _ext(auth, x509.KeyUsage), _ext(sign, x509.KeyUsage)
    assert auth_ku.critical and auth_ku.value.digital_signature
    assert not auth_ku.value.content_commitment
    assert sign_ku.critical and sign_ku.value.digital_signature and sign_ku.value.content_commitment
    assert [p.policy_identifier for p in _ext(auth, x509.CertificatePolicies).value] == [
        OID_POLICY_AUTHENTICATION
    ]
    assert [p.policy_identifier for p in _ext(sign, x509.CertificatePolicies).value] == [
        OID_POLICY_SIGNING
    ]
    facts = read_basic_facts(sign)
    assert facts == {
        OID_BASIC_FACT_NAME.dotted_string: "山田 花子",
        OID_BASIC_FACT_DATE_OF_BIRTH.dotted_string: "319850401",
        OID_BASIC_FACT_SEX.dotted_string: "2",
        OID_BASIC_FACT_ADDRESS.dotted_string: "東京都千代田区永田町一丁目7番1号",
    }
    with pytest.raises(x509.ExtensionNotFound):
        _ext(auth, x509.SubjectAlternativeName)  # no personal data in the auth certificate
    assert authority_key_identifier(auth) == key_identifier(
        ca.issuer(CertType.AUTH.ca_kind).certificate
    )
    assert authority_key_identifier(sign) == key_identifier(
        ca.issuer(CertType.SIGN.ca_kind).certificate
    )


async def test_card_validity_is_capped_at_card_expiry(ca, keys) -> None:
    card = await issue_card(ca, keys, expiry=T0 + timedelta(days=400))
    assert card.certs.sign.not_after == T0 + timedelta(days=400)


async def test_phone_certificates_are_issued_from_a_verified_application(ca, keys) -> None:
    card = await issue_card(ca, keys, expiry=T0 + timedelta(days=900))
    verified = await verify(ca, card, "saga-1", os.urandom(32))
    assert verified.person_id == card.person.person_id
    assert verified.se == SE
    assert verified.certificates == (CertType.AUTH, CertType.SIGN)
    assert (await ca.state_check("saga-1")).branch is Branch.NEW_ISSUANCE
    auth_key, sign_key = keys(), keys()
    issued = await ca.issue(
        "saga-1",
        [
            key_request("saga-1", CertType.AUTH, auth_key),
            key_request("saga-1", CertType.SIGN, sign_key),
        ],
    )
    auth, sign = (i.certificate for i in issued)
    card_sign_cert = card.certs.sign.certificate
    # expires with the card certificate it was issued from (DOMAIN §2)
    assert (
        auth.not_valid_after_utc == sign.not_valid_after_utc == card_sign_cert.not_valid_after_utc
    )
    # the four basic facts and the localities come from the card signing certificate
    assert (
        _ext(sign, x509.SubjectAlternativeName).value
        == _ext(card_sign_cert, x509.SubjectAlternativeName).value
    )
    assert sign.subject.get_attributes_for_oid(NameOID.LOCALITY_NAME) == (
        card_sign_cert.subject.get_attributes_for_oid(NameOID.LOCALITY_NAME)
    )
    assert sign.serial_number != auth.serial_number
    assert sign.serial_number.bit_length() > 64
    records = await ca.certificates(holder=Holder.PHONE)
    assert {(r.cert_type, r.se_cin, r.card_serial, r.saga_id, r.status) for r in records} == {
        (CertType.AUTH, SE.cin, card.certs.sign.serial, "saga-1", Status.VALID),
        (CertType.SIGN, SE.cin, card.certs.sign.serial, "saga-1", Status.VALID),
    }

    # a redelivered request returns the same certificates and issues nothing new
    again = await ca.issue(
        "saga-1",
        [
            key_request("saga-1", CertType.SIGN, sign_key),
            key_request("saga-1", CertType.AUTH, auth_key),
        ],
    )
    assert [a.der for a in again] == [issued[1].der, issued[0].der]
    assert len(await ca.certificates(holder=Holder.PHONE)) == 2
    # the same saga cannot certify another key of a type it already has
    with pytest.raises(InvalidRequest):
        await ca.issue("saga-1", [key_request("saga-1", CertType.AUTH, keys())])


async def test_only_the_applied_certificates_and_proven_keys_are_issued(ca, keys) -> None:
    card = await issue_card(ca, keys)
    await verify(ca, card, "saga-1", os.urandom(32), certificates=(CertType.AUTH,))
    with pytest.raises(InvalidRequest):
        await ca.issue("saga-1", [key_request("saga-1", CertType.SIGN, keys())])
    # a proof by the signing-key slot does not prove an authentication key
    signing_proof = key_request("saga-1", CertType.SIGN, keys())
    with pytest.raises(ProofOfPossessionFailed) as refused:
        await ca.issue("saga-1", [dataclasses.replace(signing_proof, cert_type=CertType.AUTH)])
    assert refused.value.code is CaErrorCode.PROOF_OF_POSSESSION_FAILED
    # a genuine proof presented with another public key
    other = key_request("saga-1", CertType.AUTH, keys())
    stolen = dataclasses.replace(other, public_key_der=spki(keys()))
    with pytest.raises(ProofOfPossessionFailed):
        await ca.issue("saga-1", [stolen])
    with pytest.raises(InvalidPublicKey):
        await ca.issue("saga-1", [dataclasses.replace(other, public_key_der=b"not a key")])
    assert await ca.certificates(holder=Holder.PHONE) == []
    with pytest.raises(ApplicationNotVerified):
        await ca.issue("saga-2", [key_request("saga-2", CertType.AUTH, keys())])


async def _refused(ca, keys, saga_id: str) -> None:
    """Nothing was issued and issuance in that saga is impossible."""
    assert await ca.certificates(holder=Holder.PHONE) == []
    with pytest.raises(ApplicationNotVerified):
        await ca.issue(saga_id, [key_request(saga_id, CertType.AUTH, keys())])


async def test_forged_application_is_refused(ca, keys) -> None:
    card = await issue_card(ca, keys)
    impostor = keys()
    app = application("saga-1", nonce := os.urandom(32))
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    forged = impostor.sign(app.to_be_signed(), padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(ForgedSignature) as refused:
        await ca.verify_application(
            saga_id="saga-1",
            expected_nonce=nonce,
            expected_se=SE,
            to_be_signed=app.to_be_signed(),
            signature=forged,
            card_certificate=card.certs.sign.der,
        )
    assert refused.value.code is CaErrorCode.FORGED_SIGNATURE
    # a genuine signature over other bytes is forged too
    tampered = application("saga-1", nonce, se=OTHER_SE)
    with pytest.raises(ForgedSignature):
        await ca.verify_application(
            saga_id="saga-1",
            expected_nonce=nonce,
            expected_se=SE,
            to_be_signed=tampered.to_be_signed(),
            signature=card_sign(card, app),
            card_certificate=card.certs.sign.der,
        )
    await _refused(ca, keys, "saga-1")


async def test_expired_card_is_refused(ca, keys, clock) -> None:
    card = await issue_card(ca, keys, expiry=T0 + timedelta(days=30))
    clock.advance(timedelta(days=31))
    with pytest.raises(CardCertificateExpired) as refused:
        await verify(ca, card, "saga-1", os.urandom(32), requested_at=clock.now)
    assert refused.value.code is CaErrorCode.CARD_CERTIFICATE_EXPIRED
    await _refused(ca, keys, "saga-1")


async def test_revoked_card_is_refused(ca, keys) -> None:
    card = await issue_card(ca, keys)
    await ca.revoke(card.certs.sign.serial, Cause.CARD_FACTS_CHANGED)
    with pytest.raises(CardCertificateRevoked) as refused:
        await verify(ca, card, "saga-1", os.urandom(32))
    assert refused.value.code is CaErrorCode.CARD_CERTIFICATE_REVOKED
    await _refused(ca, keys, "saga-1")


async def test_replayed_nonce_is_refused(ca, keys) -> None:
    card = await issue_card(ca, keys)
    nonce = os.urandom(32)
    app = application("saga-1", nonce)
    first = dict(
        expected_se=SE,
        to_be_signed=app.to_be_signed(),
        signature=card_sign(card, app),
        card_certificate=card.certs.sign.der,
    )
    await ca.verify_application(saga_id="saga-1", expected_nonce=nonce, **first)
    # the captured application presented again in another saga
    with pytest.raises(NonceReplayed) as refused:
        await ca.verify_application(saga_id="saga-2", expected_nonce=nonce, **first)
    assert refused.value.code is CaErrorCode.NONCE_REPLAYED
    await _refused_in_saga(ca, keys, "saga-2")
    # the same request redelivered in its own saga is answered the same, not refused
    again = await ca.verify_application(saga_id="saga-1", expected_nonce=nonce, **first)
    assert again.card_serial == card.certs.sign.serial


async def _refused_in_saga(ca, keys, saga_id: str) -> None:
    with pytest.raises(ApplicationNotVerified):
        await ca.issue(saga_id, [key_request(saga_id, CertType.AUTH, keys())])


async def test_stale_or_foreign_nonce_is_refused(ca, keys, clock) -> None:
    card = await issue_card(ca, keys)
    app = application("saga-1", os.urandom(32))
    with pytest.raises(NonceUnknown):
        await ca.verify_application(
            saga_id="saga-1",
            expected_nonce=os.urandom(32),
            expected_se=SE,
            to_be_signed=app.to_be_signed(),
            signature=card_sign(card, app),
            card_certificate=card.certs.sign.der,
        )
    clock.advance(timedelta(hours=1))
    with pytest.raises(NonceExpired):
        await verify(ca, card, "saga-1", os.urandom(32), requested_at=T0)
    await _refused(ca, keys, "saga-1")


async def test_wrong_se_is_refused(ca, keys) -> None:
    card = await issue_card(ca, keys)
    with pytest.raises(WrongSecureElement) as refused:
        await verify(ca, card, "saga-1", os.urandom(32), se=OTHER_SE, expected_se=SE)
    assert refused.value.code is CaErrorCode.WRONG_SECURE_ELEMENT
    await _refused(ca, keys, "saga-1")


async def test_a_card_certificate_we_never_recorded_is_refused(ca, keys) -> None:
    person = make_person("person-9")
    pending = ca.build_card_certificates(
        person,
        keys().public_key(),
        (sign_key := keys()).public_key(),
        card_expiry=T0 + timedelta(days=99),
    )
    app = application("saga-1", nonce := os.urandom(32))
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    with pytest.raises(UnknownCardCertificate):
        await ca.verify_application(
            saga_id="saga-1",
            expected_nonce=nonce,
            expected_se=SE,
            to_be_signed=app.to_be_signed(),
            signature=sign_key.sign(app.to_be_signed(), padding.PKCS1v15(), hashes.SHA256()),
            card_certificate=pending.sign.der,
        )


async def test_state_check_branches(ca, keys, clock) -> None:
    card = await issue_card(ca, keys)
    first = await _issue_both(ca, keys, card, "saga-1", se=SE)
    # active on another SE → model change, the old ones revoked after success
    clock.advance(timedelta(minutes=1))
    await verify(
        ca,
        card,
        "saga-2",
        os.urandom(32),
        se=OTHER_SE,
        expected_se=OTHER_SE,
        requested_at=clock.now,
    )
    check = await ca.state_check("saga-2")
    assert check.branch is Branch.MODEL_CHANGE
    assert set(check.revoke_after_success) == {c.serial for c in first}
    assert check.old_se == (SE.cin,)
    # active on this SE (app reinstalled) → reissue: revoke the old now
    await verify(ca, card, "saga-3", os.urandom(32), requested_at=clock.now)
    check = await ca.state_check("saga-3")
    assert check.branch is Branch.REISSUE_SAME_SE
    assert set(check.revoke_now) == {c.serial for c in first}
    # held on another SE (temporary loss) → model change
    await ca.change_status_of(Status.HELD, Cause.TEMPORARY_LOSS, se_cin=SE.cin)
    assert (await ca.state_check("saga-2")).branch is Branch.MODEL_CHANGE
    # held on this SE (phone found) → release auth, revoke and reissue sign
    check = await ca.state_check("saga-3")
    auth, sign = first
    assert check.branch is Branch.FOUND_ON_SAME_SE
    assert check.release == (auth.serial,) and check.revoke_now == (sign.serial,)
    # revoked → new issuance
    await ca.change_status_of(Status.REVOKED, Cause.LOSS, se_cin=SE.cin)
    assert (await ca.state_check("saga-3")).branch is Branch.NEW_ISSUANCE
    # card certificate revoked since verification → renew the card first
    await ca.revoke(card.certs.sign.serial, Cause.CARD_FACTS_CHANGED)
    assert (await ca.state_check("saga-3")).branch is Branch.RENEW_CARD_FIRST


async def test_expired_phone_certificates_count_as_none(ca, keys, clock) -> None:
    card = await issue_card(ca, keys, expiry=T0 + timedelta(days=10))
    await _issue_both(ca, keys, card, "saga-1")
    renewed = await issue_card(ca, keys, make_person())
    clock.advance(timedelta(days=11))
    # the renewal revoked them anyway; the check must not see them either way
    await verify(ca, renewed, "saga-2", os.urandom(32), requested_at=clock.now)
    assert (await ca.state_check("saga-2")).branch is Branch.NEW_ISSUANCE
