"""Applications signed by the My Number Card, and the proof of possession of new keys.

**The application** (FLOWS.md §1 step 5) is ``Application`` below. Its canonical bytes are
``Application.to_be_signed()``: the JSON object of the fields in declaration order, no
whitespace, ``certificates`` sorted and de-duplicated, ``nonce`` in base64, the time as
RFC 3339 UTC. The card signs them with its signing key (EF ``001A``, after VERIFY of the
card's signing password ``001B``): COMPUTE DIGITAL SIGNATURE over
``sha256_digest_info(to_be_signed)``, i.e. RSASSA-PKCS1-v1_5 with SHA-256 (RFC 8017 §8.2).

The CA verifies the exact bytes the card signed (then decodes them strictly): signature,
card certificate chain by key identifier, validity, revocation, the nonce and the SE.

**Nonces** are issued by the orchestrator, one per saga, and sent to the CA with the
verification request. The CA keeps the ledger of consumed nonces: a nonce is accepted for
one application only (``NonceReplayed`` otherwise), must be the one issued for this saga
(``NonceUnknown``) and the application must be recent (``NonceExpired``: ``requested_at``
older than the freshness window, or in the future beyond the allowed clock skew).

**Proof of possession** (FLOWS.md §1 step 8): the applet's GENERATE KEY PAIR answers
the new public key and a signature by the new key (RSASSA-PKCS1-v1_5, SHA-256) over
``protocol.jpki.proof_message(key EF, challenge, SubjectPublicKeyInfo)``, the TSM's
challenge having come with the command inside the SP-TSM's SCP03 session. The TSM checks
it and forwards public key, challenge and proof; the CA checks the signature again before
it certifies the key, so no component has to trust another's word that the key exists in
the applet's slot for that certificate type. (The key EF in the signed message stops a
signing-key proof from being presented for the authentication certificate.)
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Annotated

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from protocol import jpki
from protocol.jpki import PinOption
from workers.ca.errors import (
    ForgedSignature,
    InvalidPublicKey,
    MalformedApplication,
    ProofOfPossessionFailed,
)
from workers.ca.profiles import CertType, require_rsa_2048

# DOMAIN §1: the private-key EFs of the two certificate types
KEY_EF = {CertType.AUTH: jpki.EF.AUTH_KEY, CertType.SIGN: jpki.EF.SIGN_KEY}

# RFC 8017 §9.2 note 1: DER prefix of DigestInfo for SHA-256.
SHA256_DIGEST_INFO_PREFIX = bytes.fromhex("3031300d060960864801650304020105000420")

HexId = Annotated[str, msgspec.Meta(pattern="^[0-9A-F]{2,64}$")]
Identifier = Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9_-]{1,64}$")]
Nonce = Annotated[bytes, msgspec.Meta(min_length=16, max_length=64)]


class SeIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """The secure element (GP card data): CIN and KDD, upper-case hex."""

    cin: HexId
    kdd: HexId


class Application(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the My Number Card signs. Fields are only ever added at the end, with defaults."""

    application_id: Identifier  # the saga id
    nonce: Nonce
    device_id: Identifier
    app_instance_id: Identifier
    se: SeIdentity
    certificates: Annotated[list[CertType], msgspec.Meta(min_length=1, max_length=2)]
    requested_at: datetime
    pin_option: PinOption | None = None

    def to_be_signed(self) -> bytes:
        canonical = msgspec.structs.replace(self, certificates=sorted(set(self.certificates)))
        return _encoder.encode(canonical)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Application)


def parse_application(to_be_signed: bytes) -> Application:
    """Decode signed bytes strictly; anything odd is a ``MalformedApplication``."""
    try:
        application = _decoder.decode(to_be_signed)
    except msgspec.DecodeError:
        raise MalformedApplication("the signed application does not decode") from None
    if len(set(application.certificates)) != len(application.certificates):
        raise MalformedApplication("the application names a certificate twice")
    if application.requested_at.tzinfo is None:
        raise MalformedApplication("the application time has no time zone")
    return application


def sha256_digest_info(data: bytes) -> bytes:
    """What COMPUTE DIGITAL SIGNATURE is given: DigestInfo(SHA-256(data))."""
    return SHA256_DIGEST_INFO_PREFIX + hashlib.sha256(data).digest()


def application_digest(to_be_signed: bytes) -> str:
    return hashlib.sha256(to_be_signed).hexdigest()


def _verify_pkcs1_sha256(public_key: rsa.RSAPublicKey, signature: bytes, data: bytes) -> bool:
    try:
        public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def verify_card_signature(public_key: object, signature: bytes, to_be_signed: bytes) -> None:
    if not isinstance(public_key, rsa.RSAPublicKey) or not _verify_pkcs1_sha256(
        public_key, signature, to_be_signed
    ):
        raise ForgedSignature("the card signature does not verify")


def load_subject_key(spki_der: bytes) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_der_public_key(spki_der)
    except (ValueError, TypeError):
        raise InvalidPublicKey("the public key is not a DER SubjectPublicKeyInfo") from None
    return require_rsa_2048(key)


def verify_proof_of_possession(
    cert_type: CertType, spki_der: bytes, challenge: bytes, signature: bytes
) -> rsa.RSAPublicKey:
    """The subject key, once its signature over the applet's proof message verifies."""
    key = load_subject_key(spki_der)
    if not jpki.MIN_CHALLENGE <= len(challenge) <= jpki.MAX_CHALLENGE:
        raise ProofOfPossessionFailed("the proof's challenge has the wrong length")
    message = jpki.proof_message(KEY_EF[cert_type], challenge, spki_der)
    if not _verify_pkcs1_sha256(key, signature, message):
        raise ProofOfPossessionFailed(f"no proof of possession for the {cert_type.value} key")
    return key
