"""Pure pieces of the life-cycle flows: the disposal confirmation check and the endings the
phone is told (codes, never text)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from orchestrator import lifecycle_messages as lm
from orchestrator.flows import disposal, online, pin_reset
from orchestrator.flows.lifecycle_common import result
from orchestrator.messages import CertificateKind, Outcome, Reason, SeIdentity
from workers.ca import messages as ca
from workers.ca.profiles import CertType
from workers.ca.revocation import Status

SE = SeIdentity(cin="0A" * 10, kdd="0A" * 10)


def _certificate(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "phone")])
    now = datetime.now(UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(7)
                   .not_valid_before(now).not_valid_after(now + timedelta(days=1))
                   .sign(key, hashes.SHA256()))
    return certificate.public_bytes(Encoding.DER)


@pytest.fixture(scope="module")
def phone_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _data(live_der: bytes, kind: CertType = CertType.SIGN) -> disposal.DisposalData:
    return disposal.DisposalData(
        device_id="phone-1", app_instance_id="a" * 32, se=SE, nonce=b"n" * 32,
        live=[ca.LiveCertificate(serial="07", kind=kind, person_id="p", status=Status.VALID,
                                 certificate=live_der)],
    )


def _confirm(key: rsa.RSAPrivateKey, data: disposal.DisposalData, der: bytes,
             kind: CertificateKind = CertificateKind.SIGN, challenge: bytes | None = None
             ) -> lm.DisposalConfirmed:
    signed = challenge or disposal.challenge_of(data).to_be_signed()
    signature = key.sign(signed, padding.PKCS1v15(), hashes.SHA256())
    return lm.DisposalConfirmed(kind=kind, signature=signature, certificate=der)


def test_a_confirmation_by_the_live_key_verifies(phone_key) -> None:
    der = _certificate(phone_key)
    data = _data(der)
    assert disposal.confirmation_verifies(data, _confirm(phone_key, data, der))


def test_confirmations_that_do_not_count(phone_key) -> None:
    der = _certificate(phone_key)
    data = _data(der)
    # the certificate is live but as the authentication certificate, not the signing one
    assert not disposal.confirmation_verifies(_data(der, CertType.AUTH),
                                              _confirm(phone_key, data, der))
    # a certificate the CA does not list as live on this SE
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_der = _certificate(other)
    assert not disposal.confirmation_verifies(data, _confirm(other, data, other_der))
    # the live certificate, but the signature is over another challenge (a replay)
    replay = _confirm(phone_key, data, der, challenge=b"an older challenge")
    assert not disposal.confirmation_verifies(data, replay)


def test_lifecycle_result_codes() -> None:
    done = result(lm.LifecycleFlow.DISPOSAL, "completed", None, None, applet_deleted=True)
    assert (done.outcome, done.applet_deleted) == (lm.LifecycleOutcome.DONE, True)
    refused = result(lm.LifecycleFlow.DISPOSAL, "compensated", "s04 ...",
                     lm.LifecycleReason.BAD_CONFIRMATION)
    assert (refused.outcome, refused.reason) == (lm.LifecycleOutcome.REFUSED,
                                                 lm.LifecycleReason.BAD_CONFIRMATION)
    assert result(lm.LifecycleFlow.DISPOSAL, "compensated", "aborted by app.event.x",
                  None).reason is lm.LifecycleReason.USER_CANCELLED
    assert result(lm.LifecycleFlow.DISPOSAL, "compensated", "s02_confirmation timeout",
                  None).reason is lm.LifecycleReason.TIMEOUT
    assert result(lm.LifecycleFlow.DISPOSAL, "failed_needs_operator", "undo refused: x",
                  None).reason is lm.LifecycleReason.INTERNAL


def test_online_tells_the_phone_only_about_a_deleted_applet() -> None:
    data = online.OnlineData(device_id="phone-1", se=SE)
    assert online.ending(data, "completed", None) is None
    data.deleted = True
    told = online.ending(data, "completed", None)
    assert told is not None and told.applet_deleted


def test_pin_reset_endings() -> None:
    data = pin_reset.PinResetData(application_id="a" * 32, device_id="phone-1",
                                  app_instance_id="b" * 32, se=SE,
                                  certificates=[CertificateKind.AUTH],
                                  live=[CertificateKind.AUTH, CertificateKind.SIGN])
    ok = pin_reset.ending(data, "completed", None)
    assert (ok.outcome, ok.phase, ok.certificates) == (
        Outcome.ISSUED, 4, [CertificateKind.AUTH, CertificateKind.SIGN])
    forged = pin_reset.ending(data, "compensated", "s03_verify rejected: forged_signature")
    assert (forged.outcome, forged.reason) == (Outcome.REFUSED, Reason.BAD_CARD_SIGNATURE)
    data.refusal = lm.LifecycleReason.NOT_THE_OWNER
    stranger = pin_reset.ending(data, "compensated", "s05_owner_only ...")
    assert (stranger.outcome, stranger.phase) == (Outcome.REFUSED, 4)
