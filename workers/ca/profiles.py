"""Certificate profiles of the JPKI CAs (DOMAIN.md §2), as pure builders.

Every builder takes the issuing key, the subject's public key, the serial and the validity
window from its caller (the clock and the serial source are injected higher up), and
returns a signed ``x509.Certificate``. Nothing here touches storage.

Phone certificates, issued for every saga, come from an ``EndEntityTemplate`` instead: the
same profile, with the parts fixed by issuer, type and card encoded once, and each
certificate's TBSCertificate assembled from them and signed with the issuer's key directly.
It produces byte for byte what ``build_end_entity`` produces (PKCS#1 v1.5 signatures are
deterministic), for a fraction of the CPU, and the signature runs without the GIL, which
pyca's certificate builder holds throughout.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from workers.ca.errors import InvalidPublicKey, InvalidRequest

# DOMAIN.md §2: JPKI arcs under 1.2.392.200149.8.5.
OID_BASIC_FACT_NAME = x509.ObjectIdentifier("1.2.392.200149.8.5.5.1")
OID_BASIC_FACT_NAME_SUBSTITUTES = x509.ObjectIdentifier("1.2.392.200149.8.5.5.2")
OID_BASIC_FACT_SEX = x509.ObjectIdentifier("1.2.392.200149.8.5.5.3")
OID_BASIC_FACT_DATE_OF_BIRTH = x509.ObjectIdentifier("1.2.392.200149.8.5.5.4")
OID_BASIC_FACT_ADDRESS = x509.ObjectIdentifier("1.2.392.200149.8.5.5.5")
OID_BASIC_FACT_ADDRESS_SUBSTITUTES = x509.ObjectIdentifier("1.2.392.200149.8.5.5.6")
OID_POLICY_SIGNING = x509.ObjectIdentifier("1.2.392.200149.8.5.1.1.20")
OID_POLICY_AUTHENTICATION = x509.ObjectIdentifier("1.2.392.200149.8.5.1.3.30")

RSA_BITS = 2048
RSA_EXPONENT = 65537


class CaKind(enum.StrEnum):
    """The two JPKI CAs; each certificate type has its own CA."""

    AUTH = "auth"  # user authentication (利用者証明用)
    SIGN = "sign"  # digital signature (署名用)


class CertType(enum.StrEnum):
    AUTH = "auth"
    SIGN = "sign"

    @property
    def ca_kind(self) -> CaKind:
        return CaKind(self.value)


class Holder(enum.StrEnum):
    CARD = "card"  # My Number Card
    PHONE = "phone"  # a smartphone's secure element


class Sex(enum.StrEnum):
    """Codes of the basic-residents register (ISO/IEC 5218 style): 1 male, 2 female, 3 unknown."""

    MALE = "1"
    FEMALE = "2"
    UNKNOWN = "3"


# Era start dates (Japanese calendar) for the E digit of EYYYYMMDD.
_ERAS: tuple[tuple[date, str], ...] = (
    (date(2019, 5, 1), "5"),  # Reiwa
    (date(1989, 1, 8), "4"),  # Heisei
    (date(1926, 12, 25), "3"),  # Showa
    (date(1912, 7, 30), "2"),  # Taisho
    (date(1868, 10, 23), "1"),  # Meiji
)


def jpki_date_of_birth(born: date) -> str:
    """``EYYYYMMDD``: era digit then the Gregorian date (DOMAIN.md §2; the year is *unconfirmed*
    to be Gregorian rather than the era year, and Gregorian keeps the value unambiguous)."""
    for start, era in _ERAS:
        if born >= start:
            return f"{era}{born:%Y%m%d}"
    raise InvalidRequest("date of birth precedes the Meiji era")


@dataclass(frozen=True, slots=True)
class BasicFacts:
    """The four basic facts (基本4情報) carried by a signing certificate."""

    name: str
    date_of_birth: date
    sex: Sex
    address: str


@dataclass(frozen=True, slots=True)
class CaNames:
    """Distinguished names of the two CAs. The defaults carry a test marker (``O=JPKI-TEST``)."""

    organization: str = "JPKI-TEST"
    authority: str = "jpki-mobile test authority"

    def for_kind(self, kind: CaKind) -> x509.Name:
        unit = (
            "JPKI for user authentication" if kind is CaKind.AUTH else "JPKI for digital signature"
        )
        return x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.organization),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, self.authority),
            ]
        )


def _der_utf8(text: str) -> bytes:
    """DER UTF8String (X.690 §8.23), the value of our otherName entries."""
    data = text.encode("utf-8")
    if len(data) < 0x80:
        length = bytes([len(data)])
    else:
        width = (len(data).bit_length() + 7) // 8
        length = bytes([0x80 | width]) + len(data).to_bytes(width, "big")
    return b"\x0c" + length + data


def basic_facts_san(facts: BasicFacts) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName(
        [
            x509.OtherName(OID_BASIC_FACT_NAME, _der_utf8(facts.name)),
            x509.OtherName(
                OID_BASIC_FACT_DATE_OF_BIRTH, _der_utf8(jpki_date_of_birth(facts.date_of_birth))
            ),
            x509.OtherName(OID_BASIC_FACT_SEX, _der_utf8(facts.sex.value)),
            x509.OtherName(OID_BASIC_FACT_ADDRESS, _der_utf8(facts.address)),
        ]
    )


def read_basic_facts(cert: x509.Certificate) -> dict[str, str]:
    """The otherName entries of a signing certificate, by JPKI OID, as text."""
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    facts: dict[str, str] = {}
    for entry in san.get_values_for_type(x509.OtherName):
        value = entry.value
        if not value or value[0] != 0x0C:
            continue
        offset = 2 if value[1] < 0x80 else 2 + (value[1] & 0x7F)
        facts[entry.type_id.dotted_string] = value[offset:].decode("utf-8")
    return facts


def require_rsa_2048(public_key: object) -> rsa.RSAPublicKey:
    """Subject keys are RSA-2048 (DOMAIN.md §2); anything else is refused, never crashes."""
    if not isinstance(public_key, rsa.RSAPublicKey) or public_key.key_size != RSA_BITS:
        raise InvalidPublicKey("subject key must be RSA-2048")
    return public_key


def _ski(public_key: rsa.RSAPublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def build_ca_certificate(
    *,
    name: x509.Name,
    key: rsa.RSAPrivateKey,
    serial: int,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """A self-signed single-tier root; generations share ``name`` and differ by key id."""
    ski = _ski(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier(ski.digest, None, None), critical=False)
        .sign(key, hashes.SHA256())
    )


@dataclass(frozen=True, slots=True)
class Issuer:
    """One CA generation able to sign: its certificate and (never printed) private key."""

    kind: CaKind
    generation: int
    certificate: x509.Certificate
    key: rsa.RSAPrivateKey
    # derived once: every issuance answers with the CA certificate and names the key id
    key_id: bytes = field(init=False, repr=False, compare=False)
    der: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_id", key_identifier(self.certificate))
        object.__setattr__(self, "der", self.certificate.public_bytes(serialization.Encoding.DER))

    def __repr__(self) -> str:
        return f"Issuer(kind={self.kind.value}, generation={self.generation}, key=<redacted>)"


def _end_entity_extensions(
    issuer: Issuer, cert_type: CertType, subject_alt_name: x509.SubjectAlternativeName | None
) -> tuple[list[tuple[x509.ExtensionType, bool]], list[tuple[x509.ExtensionType, bool]]]:
    """The profile's extensions with their criticality, those before the subject key
    identifier and those after it (the order the certificate carries them in)."""
    signing = cert_type is CertType.SIGN
    head: list[tuple[x509.ExtensionType, bool]] = [
        (
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=signing,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        ),
        (
            x509.CertificatePolicies(
                [
                    x509.PolicyInformation(
                        OID_POLICY_SIGNING if signing else OID_POLICY_AUTHENTICATION, None
                    )
                ]
            ),
            False,
        ),
    ]
    tail: list[tuple[x509.ExtensionType, bool]] = [
        (x509.AuthorityKeyIdentifier(issuer.key_id, None, None), False)
    ]
    if signing:
        if subject_alt_name is None:
            raise InvalidRequest("a signing certificate needs the four basic facts")
        tail.append((subject_alt_name, False))
    return head, tail


def build_end_entity(
    *,
    issuer: Issuer,
    cert_type: CertType,
    subject: x509.Name,
    public_key: rsa.RSAPublicKey,
    serial: int,
    not_before: datetime,
    not_after: datetime,
    facts: BasicFacts | None,
    subject_alt_name: x509.SubjectAlternativeName | None = None,
) -> x509.Certificate:
    """A user-authentication or signing certificate (same profile for card and phone).

    A signing certificate carries the four basic facts: from ``facts`` (a card), or as the
    card signing certificate's ``subject_alt_name`` copied unchanged (a phone).
    """
    _check_issuer(issuer, cert_type)
    if not_after <= not_before:
        raise InvalidRequest("validity window is empty (card certificate already expired?)")
    if cert_type is CertType.SIGN and subject_alt_name is None and facts is not None:
        subject_alt_name = basic_facts_san(facts)
    head, tail = _end_entity_extensions(issuer, cert_type, subject_alt_name)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for extension, critical in [*head, (_ski(public_key), False), *tail]:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer.key, hashes.SHA256())


def _check_issuer(issuer: Issuer, cert_type: CertType) -> None:
    if issuer.kind is not cert_type.ca_kind:
        raise InvalidRequest(f"{cert_type.value} certificates come from the {cert_type.value} CA")


# --- DER pieces of the template (X.690 DER; RFC 5280 §4.1) ---------------------------------

_SEQUENCE, _SET, _INTEGER, _BIT_STRING, _OCTET_STRING, _OID = 0x30, 0x31, 0x02, 0x03, 0x04, 0x06
_UTF8_STRING, _UTC_TIME, _GENERALIZED_TIME, _BOOLEAN_TRUE = 0x0C, 0x17, 0x18, b"\x01\x01\xff"
_VERSION_3 = bytes.fromhex("a003020102")  # [0] EXPLICIT INTEGER 2
_SHA256_WITH_RSA = bytes.fromhex("300d06092a864886f70d01010b0500")  # RFC 4055 §5, NULL params
_OID_COMMON_NAME = bytes.fromhex("0603550403")
_OID_SUBJECT_KEY_IDENTIFIER = bytes.fromhex("0603551d0e")


def der(tag: int, content: bytes) -> bytes:
    """One DER object with a single-octet tag (X.690 §8.1: definite length, minimal)."""
    length = len(content)
    if length < 0x80:
        return bytes((tag, length)) + content
    size = (length.bit_length() + 7) // 8
    return bytes((tag, 0x80 | size)) + length.to_bytes(size, "big") + content


def _oid(oid: x509.ObjectIdentifier) -> bytes:
    arcs = [int(arc) for arc in oid.dotted_string.split(".")]
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            chunk.append(0x80 | (arc & 0x7F))
        body += bytes(reversed(chunk))
    return der(_OID, bytes(body))


def _extension(extension: x509.ExtensionType, critical: bool) -> bytes:
    """Extension ::= SEQUENCE { extnID, critical BOOLEAN DEFAULT FALSE, extnValue }"""
    flag = _BOOLEAN_TRUE if critical else b""  # DER leaves a default value out
    return der(_SEQUENCE, _oid(extension.oid) + flag + der(_OCTET_STRING, extension.public_bytes()))


def _time(moment: datetime) -> bytes:
    """RFC 5280 §4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050; whole seconds."""
    if moment.tzinfo is not None:  # a naive time is UTC already, as for pyca's builder
        moment = moment.astimezone(UTC)
    if moment.year < 2050:
        return der(_UTC_TIME, moment.strftime("%y%m%d%H%M%SZ").encode())
    return der(_GENERALIZED_TIME, moment.strftime("%Y%m%d%H%M%SZ").encode())


def _positive_integer(value: int) -> bytes:
    # one more bit than the value needs keeps the sign bit clear (X.690 §8.3)
    return der(_INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


@dataclass(frozen=True, slots=True)
class EndEntityTemplate:
    """``build_end_entity`` for one issuer, type and subject prefix, encoded once.

    ``issue`` adds the serial, the validity, the common name and the subject key: the
    TBSCertificate is assembled from the encoded parts and signed with the issuer's key
    (RSASSA-PKCS1-v1_5, SHA-256), with no x509 object in between.
    """

    issuer: Issuer
    issuer_name: bytes  # encoded
    subject_rdns: bytes  # the encoded RDNs that come before the common name
    extensions_head: bytes  # encoded extensions before the subject key identifier
    extensions_tail: bytes  # and after it

    def issue(
        self,
        *,
        public_key: rsa.RSAPublicKey,
        serial: int,
        common_name: str,
        not_before: datetime,
        not_after: datetime,
    ) -> bytes:
        """The certificate's DER; the validity keeps whole seconds, as the encoding does."""
        if not_after <= not_before:
            raise InvalidRequest("validity window is empty (card certificate already expired?)")
        cn = der(_SET, der(_SEQUENCE, _OID_COMMON_NAME + der(_UTF8_STRING, common_name.encode())))
        spki = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        # RFC 5280 §4.2.1.2 method (1), as x509.SubjectKeyIdentifier.from_public_key
        key_id = hashlib.sha1(  # noqa: S324 - an identifier, not a security function
            public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        ).digest()
        ski = der(
            _SEQUENCE,
            _OID_SUBJECT_KEY_IDENTIFIER + der(_OCTET_STRING, der(_OCTET_STRING, key_id)),
        )
        extensions = self.extensions_head + ski + self.extensions_tail
        tbs = der(
            _SEQUENCE,
            _VERSION_3
            + _positive_integer(serial)
            + _SHA256_WITH_RSA
            + self.issuer_name
            + der(_SEQUENCE, _time(not_before) + _time(not_after))
            + der(_SEQUENCE, self.subject_rdns + cn)
            + spki
            + der(0xA3, der(_SEQUENCE, extensions)),
        )
        signature = self.issuer.key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
        return der(_SEQUENCE, tbs + _SHA256_WITH_RSA + der(_BIT_STRING, b"\x00" + signature))


def end_entity_template(
    issuer: Issuer,
    cert_type: CertType,
    subject_rdns: Sequence[x509.NameAttribute],
    *,
    subject_alt_name: x509.SubjectAlternativeName | None = None,
) -> EndEntityTemplate:
    """The template of ``build_end_entity(issuer, cert_type, subject=subject_rdns + CN, ...,
    subject_alt_name=...)``: the subject is ``subject_rdns`` followed by the common name."""
    _check_issuer(issuer, cert_type)
    head, tail = _end_entity_extensions(issuer, cert_type, subject_alt_name)
    name = x509.Name(list(subject_rdns)).public_bytes()
    return EndEntityTemplate(
        issuer=issuer,
        issuer_name=issuer.certificate.subject.public_bytes(),
        subject_rdns=name[_header_length(name) :],
        extensions_head=b"".join(_extension(e, critical) for e, critical in head),
        extensions_tail=b"".join(_extension(e, critical) for e, critical in tail),
    )


def _header_length(encoded: bytes) -> int:
    """Tag and length octets of one DER object (single-octet tag)."""
    return 2 if encoded[1] < 0x80 else 2 + (encoded[1] & 0x7F)


def auth_subject_rdns() -> list[x509.NameAttribute]:
    return [x509.NameAttribute(NameOID.COUNTRY_NAME, "JP")]


def sign_subject_rdns(prefecture: str, city: str) -> list[x509.NameAttribute]:
    return [
        x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, prefecture),
        x509.NameAttribute(NameOID.LOCALITY_NAME, city),
    ]


def auth_subject(opaque_id: str) -> x509.Name:
    return x509.Name([*auth_subject_rdns(), x509.NameAttribute(NameOID.COMMON_NAME, opaque_id)])


def sign_subject(prefecture: str, city: str, issue_id: str) -> x509.Name:
    return x509.Name(
        [*sign_subject_rdns(prefecture, city), x509.NameAttribute(NameOID.COMMON_NAME, issue_id)]
    )


def key_identifier(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def authority_key_identifier(cert: x509.Certificate) -> bytes | None:
    """The AKI key id, or None when absent or unparsable (a stranger's certificate)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
        return None
    return ext.value.key_identifier
