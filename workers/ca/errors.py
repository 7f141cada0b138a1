"""Typed errors of the JPKI CA, each with the ``CaErrorCode`` a reply carries.

Replies carry the code (and a fixed, secret-free description), never exception text.
"""

from __future__ import annotations

import enum

from protocol.errors import Disposition, JpkiError


class CaErrorCode(enum.StrEnum):
    INVALID_REQUEST = "invalid_request"
    INVALID_PUBLIC_KEY = "invalid_public_key"
    PROOF_OF_POSSESSION_FAILED = "proof_of_possession_failed"
    MALFORMED_APPLICATION = "malformed_application"
    FORGED_SIGNATURE = "forged_signature"
    UNKNOWN_CARD_CERTIFICATE = "unknown_card_certificate"
    UNTRUSTED_CARD_CERTIFICATE = "untrusted_card_certificate"
    CARD_CERTIFICATE_EXPIRED = "card_certificate_expired"
    CARD_CERTIFICATE_REVOKED = "card_certificate_revoked"
    NONCE_UNKNOWN = "nonce_unknown"
    NONCE_EXPIRED = "nonce_expired"
    NONCE_REPLAYED = "nonce_replayed"
    WRONG_SECURE_ELEMENT = "wrong_secure_element"
    APPLICATION_NOT_VERIFIED = "application_not_verified"
    CERTIFICATE_NOT_FOUND = "certificate_not_found"
    PERSON_NOT_FOUND = "person_not_found"
    INVALID_TRANSITION = "invalid_transition"
    CA_KEY_UNAVAILABLE = "ca_key_unavailable"
    INTERNAL = "internal"


class CaError(JpkiError):
    code: CaErrorCode = CaErrorCode.INTERNAL


class InvalidRequest(CaError):
    code = CaErrorCode.INVALID_REQUEST
    remote_fault = True


class InvalidPublicKey(CaError):
    code = CaErrorCode.INVALID_PUBLIC_KEY
    remote_fault = True


class ProofOfPossessionFailed(CaError):
    code = CaErrorCode.PROOF_OF_POSSESSION_FAILED
    remote_fault = True


class ApplicationRefused(CaError):
    """Base of every reason to refuse a card-signed application: nothing is issued."""

    remote_fault = True


class MalformedApplication(ApplicationRefused):
    code = CaErrorCode.MALFORMED_APPLICATION


class ForgedSignature(ApplicationRefused):
    code = CaErrorCode.FORGED_SIGNATURE


class UnknownCardCertificate(ApplicationRefused):
    code = CaErrorCode.UNKNOWN_CARD_CERTIFICATE


class UntrustedCardCertificate(ApplicationRefused):
    code = CaErrorCode.UNTRUSTED_CARD_CERTIFICATE


class CardCertificateExpired(ApplicationRefused):
    code = CaErrorCode.CARD_CERTIFICATE_EXPIRED


class CardCertificateRevoked(ApplicationRefused):
    code = CaErrorCode.CARD_CERTIFICATE_REVOKED


class NonceUnknown(ApplicationRefused):
    code = CaErrorCode.NONCE_UNKNOWN


class NonceExpired(ApplicationRefused):
    code = CaErrorCode.NONCE_EXPIRED


class NonceReplayed(ApplicationRefused):
    code = CaErrorCode.NONCE_REPLAYED


class WrongSecureElement(ApplicationRefused):
    code = CaErrorCode.WRONG_SECURE_ELEMENT


class ApplicationNotVerified(CaError):
    code = CaErrorCode.APPLICATION_NOT_VERIFIED


class CertificateNotFound(CaError):
    code = CaErrorCode.CERTIFICATE_NOT_FOUND


class PersonNotFound(CaError):
    code = CaErrorCode.PERSON_NOT_FOUND


class InvalidTransition(CaError):
    """A status change the life cycle does not allow (e.g. releasing a certificate not held)."""

    code = CaErrorCode.INVALID_TRANSITION


class CaKeyUnavailable(CaError):
    """The CA key file is missing or the passphrase is wrong; operators must fix it."""

    code = CaErrorCode.CA_KEY_UNAVAILABLE
    disposition = Disposition.TRANSIENT
