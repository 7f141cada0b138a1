"""Certificate statuses, the causes that change them, and the CRL and OCSP builders (pure).

Life cycle of a certificate::

    valid ──hold──▶ held ──release──▶ valid
      │               │
      └──revoke──▶ revoked ◀──revoke──┘

Only a held certificate can be released; a revoked one stays revoked. The RFC 5280 reason
of a revocation follows from its business cause (``REASON_FOR_CAUSE``, documented in
``docs/ca.md``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509 import ocsp

from workers.ca.profiles import Issuer


class Status(enum.StrEnum):
    VALID = "valid"
    HELD = "held"  # suspended: certificateHold on the CRL and in OCSP
    REVOKED = "revoked"


class Cause(enum.StrEnum):
    """Why a certificate's status changes (what the flow or operator says happened)."""

    MODEL_CHANGE = "model_change"  # issued on a new phone (FLOWS §3)
    REISSUE = "reissue"  # new keys on the same SE (expiry, app reinstalled, found)
    LOSS = "loss"
    TEMPORARY_LOSS = "temporary_loss"  # hold
    NOT_FOUND = "not_found"  # temporary loss ran out: revoke
    FOUND = "found"  # release (authentication certificate)
    DISPOSAL = "disposal"
    FAILURE = "failure"  # broken phone
    FOREIGN_APPLET = "foreign_applet"  # someone else's keys found on a second-hand phone
    CARD_FACTS_CHANGED = "card_facts_changed"  # move, marriage: card signing cert revoked
    CARD_RENEWED = "card_renewed"
    CARD_LOST = "card_lost"
    DEATH = "death"
    COMPENSATION = "compensation"  # a saga undoing an issuance it could not finish


REASON_FOR_CAUSE: dict[Cause, x509.ReasonFlags] = {
    Cause.MODEL_CHANGE: x509.ReasonFlags.superseded,
    Cause.REISSUE: x509.ReasonFlags.superseded,
    Cause.LOSS: x509.ReasonFlags.key_compromise,
    Cause.TEMPORARY_LOSS: x509.ReasonFlags.certificate_hold,
    Cause.NOT_FOUND: x509.ReasonFlags.key_compromise,
    Cause.DISPOSAL: x509.ReasonFlags.cessation_of_operation,
    Cause.FAILURE: x509.ReasonFlags.cessation_of_operation,
    Cause.FOREIGN_APPLET: x509.ReasonFlags.key_compromise,
    Cause.CARD_FACTS_CHANGED: x509.ReasonFlags.affiliation_changed,
    Cause.CARD_RENEWED: x509.ReasonFlags.superseded,
    Cause.CARD_LOST: x509.ReasonFlags.key_compromise,
    Cause.DEATH: x509.ReasonFlags.cessation_of_operation,
    Cause.COMPENSATION: x509.ReasonFlags.cessation_of_operation,
}

HOLD_CAUSES = frozenset({Cause.TEMPORARY_LOSS})
RELEASE_CAUSES = frozenset({Cause.FOUND})
REVOKE_CAUSES = frozenset(REASON_FOR_CAUSE) - HOLD_CAUSES - RELEASE_CAUSES - {Cause.FOUND}


@dataclass(frozen=True, slots=True)
class RevokedEntry:
    serial: int
    revoked_at: datetime
    reason: x509.ReasonFlags


def build_crl(
    issuer: Issuer,
    entries: Iterable[RevokedEntry],
    *,
    number: int,
    this_update: datetime,
    next_update: datetime,
) -> x509.CertificateRevocationList:
    """A complete CRL of one CA generation (RFC 5280 §5): held and revoked entries."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.certificate.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier(issuer.key_id, None, None), critical=False)
    )
    for entry in entries:
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
        )
        # RFC 5280 §5.3.1: the reason code "unspecified" SHOULD be absent
        if entry.reason is not x509.ReasonFlags.unspecified:
            revoked = revoked.add_extension(x509.CRLReason(entry.reason), critical=False)
        builder = builder.add_revoked_certificate(revoked.build())
    return builder.sign(issuer.key, hashes.SHA256())


@dataclass(frozen=True, slots=True)
class OcspAnswer:
    """The status of one certificate as OCSP reports it."""

    status: ocsp.OCSPCertStatus
    revoked_at: datetime | None = None
    reason: x509.ReasonFlags | None = None


def build_ocsp_response(
    issuer: Issuer,
    request: ocsp.OCSPRequest,
    answer: OcspAnswer,
    *,
    this_update: datetime,
    validity: timedelta,
) -> ocsp.OCSPResponse:
    """An RFC 6960 basic response signed by the CA generation itself (§2.6, no delegation)."""
    builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
        issuer_name_hash=request.issuer_name_hash,
        issuer_key_hash=request.issuer_key_hash,
        serial_number=request.serial_number,
        algorithm=request.hash_algorithm,
        cert_status=answer.status,
        this_update=this_update,
        next_update=this_update + validity,
        revocation_time=answer.revoked_at,
        revocation_reason=answer.reason,
    )
    builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, issuer.certificate)
    try:
        nonce = request.extensions.get_extension_for_class(x509.OCSPNonce)
    except x509.ExtensionNotFound:
        pass
    else:
        # RFC 8954 / RFC 6960 §4.4.1: echo the client's nonce
        builder = builder.add_extension(nonce.value, critical=False)
    return builder.sign(issuer.key, hashes.SHA256())


def issuer_key_hash(issuer_certificate: x509.Certificate, algorithm: hashes.HashAlgorithm) -> bytes:
    """RFC 6960 §4.1.1 issuerKeyHash: hash of the issuer's subjectPublicKey BIT STRING value,
    which for RSA is the PKCS#1 RSAPublicKey DER."""
    digest = hashes.Hash(algorithm)
    digest.update(issuer_certificate.public_key().public_bytes(Encoding.DER, PublicFormat.PKCS1))
    return digest.finalize()
