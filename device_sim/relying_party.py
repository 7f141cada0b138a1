"""A small relying party: phase 4's login with the phone's user-authentication certificate.

What a service does when a JPKI user logs in: it hands out a fresh challenge, the phone
signs it with the user-authentication key (after the auth PIN) and sends back the
signature with the certificate it read from EF 000A; the service then

1. checks the challenge is one it issued, unused and not expired;
2. builds the chain to a trusted user-authentication CA **by key identifier** (the JPKI
   roots of every generation share one name, DOMAIN.md §2), checks the issuer's signature,
   the validity period and the key usage (digitalSignature);
3. verifies the PKCS#1 v1.5 / SHA-256 signature over the challenge;
4. asks the CA's OCSP responder over HTTP (RFC 6960 §A.1, POST) and accepts only a
   ``good`` answer signed by the issuer or by a responder the issuer delegated to.

Every refusal is a ``LoginRefused`` carrying a ``RefusalReason``. The checks are pure
functions; the only I/O is the HTTP POST in ``HttpOcspClient``.
"""

from __future__ import annotations

import enum
import hmac
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import aiohttp
import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID

from protocol.errors import Disposition, JpkiError

log = structlog.get_logger(__name__)

CHALLENGE_BYTES = 32
# RFC 5019 §2.2.1 style tolerance for clocks that disagree a little.
CLOCK_SKEW = timedelta(minutes=5)


class RefusalReason(enum.StrEnum):
    UNKNOWN_CHALLENGE = "unknown_challenge"  # never issued, already used, or expired
    MALFORMED_CERTIFICATE = "malformed_certificate"
    UNTRUSTED_ISSUER = "untrusted_issuer"  # no trusted auth CA with that key identifier
    BAD_CHAIN_SIGNATURE = "bad_chain_signature"
    CERTIFICATE_EXPIRED = "certificate_expired"
    CERTIFICATE_NOT_YET_VALID = "certificate_not_yet_valid"
    WRONG_KEY_USAGE = "wrong_key_usage"
    BAD_SIGNATURE = "bad_signature"
    REVOKED = "revoked"
    SUSPENDED = "suspended"  # revoked with reason certificateHold (temporary loss)
    UNKNOWN_TO_CA = "unknown_to_ca"  # OCSP status "unknown"
    OCSP_UNAVAILABLE = "ocsp_unavailable"
    OCSP_INVALID = "ocsp_invalid"  # unsigned, wrongly signed, stale, or for another certificate


class LoginRefused(JpkiError):
    """The relying party refused a login; ``reason`` says why (no secret in the text)."""

    remote_fault = True

    def __init__(self, reason: RefusalReason, detail: str = "") -> None:
        self.reason = reason
        # The responder being down is worth retrying; every other refusal is final.
        self.disposition = (
            Disposition.TRANSIENT
            if reason is RefusalReason.OCSP_UNAVAILABLE
            else Disposition.REJECTED
        )
        super().__init__(f"login refused: {reason.value}" + (f" ({detail})" if detail else ""))


@dataclass(frozen=True, slots=True)
class Challenge:
    challenge_id: str
    nonce: bytes
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class LoginAccepted:
    subject: str  # the opaque CN of the authentication certificate: the user's pseudonym
    serial_number: int
    issuer_key_id: bytes
    ocsp_produced_at: datetime


class OcspClient(Protocol):
    async def query(self, url: str, request_der: bytes) -> bytes: ...


class HttpOcspClient:
    """RFC 6960 §A.1.1: POST ``application/ocsp-request``, answer ``application/ocsp-response``."""

    def __init__(self, session: aiohttp.ClientSession, timeout_s: float = 5.0) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def query(self, url: str, request_der: bytes) -> bytes:
        try:
            async with self._session.post(
                url,
                data=request_der,
                headers={"Content-Type": "application/ocsp-request"},
                timeout=self._timeout,
            ) as response:
                if response.status != 200:
                    raise LoginRefused(
                        RefusalReason.OCSP_UNAVAILABLE, f"responder answered HTTP {response.status}"
                    )
                return await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise LoginRefused(RefusalReason.OCSP_UNAVAILABLE, type(exc).__name__) from None


def key_identifier(certificate: x509.Certificate) -> bytes:
    """The certificate's subject key identifier, or RFC 5280 §4.2.1.2 method 1 if absent."""
    try:
        return certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(certificate.public_key()).digest


def authority_key_identifier(certificate: x509.Certificate) -> bytes | None:
    try:
        aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return aki.key_identifier


def ocsp_url_of(certificate: x509.Certificate) -> str | None:
    try:
        aia = certificate.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return None
    for description in aia:
        if description.access_method == AuthorityInformationAccessOID.OCSP and isinstance(
            description.access_location, x509.UniformResourceIdentifier
        ):
            return description.access_location.value
    return None


def verify_rsa_pkcs1_sha256(public_key: object, signature: bytes, data: bytes) -> bool:
    if not isinstance(public_key, rsa.RSAPublicKey):
        return False
    try:
        public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


@dataclass(slots=True)
class ChallengeBook:
    """Challenges issued and not yet spent. Single use: a replayed answer is refused."""

    lifetime: timedelta = timedelta(minutes=2)
    _open: dict[str, Challenge] = field(default_factory=dict)

    def issue(self, now: datetime, random_bytes: Callable[[int], bytes]) -> Challenge:
        self._expire(now)
        challenge = Challenge(
            random_bytes(16).hex(), random_bytes(CHALLENGE_BYTES), now + self.lifetime
        )
        self._open[challenge.challenge_id] = challenge
        return challenge

    def spend(self, challenge_id: str, nonce: bytes, now: datetime) -> Challenge:
        self._expire(now)
        challenge = self._open.pop(challenge_id, None)
        if challenge is None or not hmac.compare_digest(challenge.nonce, nonce):
            raise LoginRefused(RefusalReason.UNKNOWN_CHALLENGE)
        return challenge

    def _expire(self, now: datetime) -> None:
        for challenge_id in [c for c, ch in self._open.items() if ch.expires_at <= now]:
            del self._open[challenge_id]


def check_certificate(
    certificate_der: bytes, trusted_roots: dict[bytes, x509.Certificate], now: datetime
) -> tuple[x509.Certificate, x509.Certificate]:
    """Steps 2 of the login: parse, find the issuer by key identifier, check it. Pure."""
    try:
        certificate = x509.load_der_x509_certificate(certificate_der)
    except ValueError:
        raise LoginRefused(RefusalReason.MALFORMED_CERTIFICATE) from None
    issuer_key_id = authority_key_identifier(certificate)
    issuer = trusted_roots.get(issuer_key_id) if issuer_key_id else None
    if issuer is None:
        raise LoginRefused(RefusalReason.UNTRUSTED_ISSUER)
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        raise LoginRefused(RefusalReason.BAD_CHAIN_SIGNATURE) from None
    if now < certificate.not_valid_before_utc:
        raise LoginRefused(RefusalReason.CERTIFICATE_NOT_YET_VALID)
    if now > certificate.not_valid_after_utc:
        raise LoginRefused(RefusalReason.CERTIFICATE_EXPIRED)
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise LoginRefused(RefusalReason.WRONG_KEY_USAGE, "no key usage") from None
    if not usage.digital_signature:
        raise LoginRefused(RefusalReason.WRONG_KEY_USAGE)
    return certificate, issuer


def build_ocsp_request(
    certificate: x509.Certificate, issuer: x509.Certificate, nonce: bytes
) -> bytes:
    builder = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(certificate, issuer, hashes.SHA1())  # noqa: S303 - RFC 5019 §2.1.1 CertID hash
        .add_extension(x509.OCSPNonce(nonce), critical=False)
    )
    return builder.build().public_bytes(serialization.Encoding.DER)


def _responder_certificate(
    response: ocsp.OCSPResponse, issuer: x509.Certificate
) -> x509.Certificate:
    """The issuer itself, or a delegated responder it signed for OCSPSigning (RFC 6960 §4.2.2.2)."""
    issuer_key_hash = hashes.Hash(hashes.SHA1())  # noqa: S303 - ResponderID byKey is SHA-1
    issuer_key_hash.update(
        issuer.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.PKCS1
        )
    )
    by_key = response.responder_key_hash
    # A name match alone may point at another generation's root (same name, other key):
    # the signature check that follows then fails, as it should.
    if (by_key is not None and by_key == issuer_key_hash.finalize()) or (
        response.responder_name is not None and response.responder_name == issuer.subject
    ):
        return issuer
    for candidate in response.certificates:
        matches = (by_key is not None and by_key == key_identifier(candidate)) or (
            response.responder_name is not None and response.responder_name == candidate.subject
        )
        if not matches:
            continue
        try:
            candidate.verify_directly_issued_by(issuer)
            eku = candidate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
            continue
        if ExtendedKeyUsageOID.OCSP_SIGNING in eku:
            return candidate
    raise LoginRefused(RefusalReason.OCSP_INVALID, "responder not authorised by the issuer")


def evaluate_ocsp_response(
    response_der: bytes,
    certificate: x509.Certificate,
    issuer: x509.Certificate,
    nonce: bytes,
    now: datetime,
) -> datetime:
    """Step 4, pure: accept only a fresh, authorised ``good``; returns ``produced_at``."""
    try:
        response = ocsp.load_der_ocsp_response(response_der)
    except ValueError:
        raise LoginRefused(RefusalReason.OCSP_INVALID, "not an OCSP response") from None
    if response.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise LoginRefused(RefusalReason.OCSP_UNAVAILABLE, response.response_status.name)
    signer = _responder_certificate(response, issuer)
    if not verify_rsa_pkcs1_sha256(
        signer.public_key(), response.signature, response.tbs_response_bytes
    ):
        raise LoginRefused(RefusalReason.OCSP_INVALID, "bad responder signature")
    try:
        echoed = response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        echoed = None
    # A responder may omit the nonce (RFC 6960 §4.4.1, e.g. pre-produced answers); freshness
    # then rests on thisUpdate below. One it does echo must be ours.
    if echoed is not None and not hmac.compare_digest(echoed, nonce):
        raise LoginRefused(RefusalReason.OCSP_INVALID, "nonce mismatch")
    for single in response.responses:
        if single.serial_number != certificate.serial_number:
            continue
        if single.this_update_utc > now + CLOCK_SKEW:
            raise LoginRefused(RefusalReason.OCSP_INVALID, "thisUpdate in the future")
        if single.next_update_utc is not None and single.next_update_utc < now - CLOCK_SKEW:
            raise LoginRefused(RefusalReason.OCSP_INVALID, "stale answer")
        if echoed is None and single.this_update_utc < now - CLOCK_SKEW:
            raise LoginRefused(RefusalReason.OCSP_INVALID, "stale answer without nonce")
        status = single.certificate_status
        if status is ocsp.OCSPCertStatus.GOOD:
            return response.produced_at_utc
        if status is ocsp.OCSPCertStatus.REVOKED:
            if single.revocation_reason is x509.ReasonFlags.certificate_hold:
                raise LoginRefused(RefusalReason.SUSPENDED)
            raise LoginRefused(RefusalReason.REVOKED)
        raise LoginRefused(RefusalReason.UNKNOWN_TO_CA)
    raise LoginRefused(RefusalReason.OCSP_INVALID, "answer is for another certificate")


class RelyingParty:
    """A login service that trusts the given user-authentication CA certificates."""

    def __init__(
        self,
        trusted_auth_roots: Sequence[x509.Certificate],
        ocsp_client: OcspClient,
        *,
        ocsp_url: str | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
        challenge_lifetime: timedelta = timedelta(minutes=2),
    ) -> None:
        self._roots = {key_identifier(root): root for root in trusted_auth_roots}
        self._ocsp = ocsp_client
        self._ocsp_url = ocsp_url  # overrides the certificate's AIA when set
        self._clock = clock
        self._random_bytes = random_bytes
        self._challenges = ChallengeBook(challenge_lifetime)

    def challenge(self) -> Challenge:
        return self._challenges.issue(self._clock(), self._random_bytes)

    async def login(
        self, challenge_id: str, nonce: bytes, certificate_der: bytes, signature: bytes
    ) -> LoginAccepted:
        now = self._clock()
        try:
            challenge = self._challenges.spend(challenge_id, nonce, now)
            certificate, issuer = check_certificate(certificate_der, self._roots, now)
            if not verify_rsa_pkcs1_sha256(certificate.public_key(), signature, challenge.nonce):
                raise LoginRefused(RefusalReason.BAD_SIGNATURE)
            url = self._ocsp_url or ocsp_url_of(certificate)
            if url is None:
                raise LoginRefused(RefusalReason.OCSP_UNAVAILABLE, "no responder URL")
            ocsp_nonce = self._random_bytes(16)
            answer = await self._ocsp.query(
                url, build_ocsp_request(certificate, issuer, ocsp_nonce)
            )
            produced_at = evaluate_ocsp_response(answer, certificate, issuer, ocsp_nonce, now)
        except LoginRefused as refusal:
            log.info("login_refused", reason=refusal.reason.value, challenge_id=challenge_id)
            raise
        cn = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        accepted = LoginAccepted(
            subject=str(cn[0].value) if cn else certificate.subject.rfc4514_string(),
            serial_number=certificate.serial_number,
            issuer_key_id=key_identifier(issuer),
            ocsp_produced_at=produced_at,
        )
        log.info("login_accepted", subject=accepted.subject, serial=hex(accepted.serial_number))
        return accepted
