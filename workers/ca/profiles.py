"""Certificate profiles of the JPKI CAs (DOMAIN.md §2), as pure builders.

Every builder takes the issuing key, the subject's public key, the serial and the validity
window from its caller (the clock and the serial source are injected higher up), and
returns a signed ``x509.Certificate``. Nothing here touches storage.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import date, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
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

    def __repr__(self) -> str:
        return f"Issuer(kind={self.kind.value}, generation={self.generation}, key=<redacted>)"

    @property
    def key_id(self) -> bytes:
        return self.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value.digest


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
    if issuer.kind is not cert_type.ca_kind:
        raise InvalidRequest(f"{cert_type.value} certificates come from the {cert_type.value} CA")
    if not_after <= not_before:
        raise InvalidRequest("validity window is empty (card certificate already expired?)")
    signing = cert_type is CertType.SIGN
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
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
            critical=True,
        )
        .add_extension(
            x509.CertificatePolicies(
                [
                    x509.PolicyInformation(
                        OID_POLICY_SIGNING if signing else OID_POLICY_AUTHENTICATION, None
                    )
                ]
            ),
            critical=False,
        )
        .add_extension(_ski(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier(issuer.key_id, None, None), critical=False)
    )
    if signing:
        if subject_alt_name is None:
            if facts is None:
                raise InvalidRequest("a signing certificate needs the four basic facts")
            subject_alt_name = basic_facts_san(facts)
        builder = builder.add_extension(subject_alt_name, critical=False)
    return builder.sign(issuer.key, hashes.SHA256())


def auth_subject(opaque_id: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
            x509.NameAttribute(NameOID.COMMON_NAME, opaque_id),
        ]
    )


def sign_subject(prefecture: str, city: str, issue_id: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, prefecture),
            x509.NameAttribute(NameOID.LOCALITY_NAME, city),
            x509.NameAttribute(NameOID.COMMON_NAME, issue_id),
        ]
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
