"""The My Number Card: the JPKI applet personalised as a card, reached by ``transmit``.

A card has no GlobalPlatform card manager and no SCP03: it is personalised once, "at the
factory" (``manufacture_card``), by a trusted line that runs the same personalisation
commands the SP-TSM sends a phone. Afterwards only the public interface of DOMAIN.md §1 is
reachable (the phone app uses it over NFC, OpenSC through a PC/SC reader): every
personalisation command then answers ``6982``.

The certificates come from an injected issuer. ``TestCardCa`` is the small test card CA
used when no CA worker is at hand (the CLI's ``jpki card serve`` and the tests).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, load_der_public_key
from cryptography.x509.oid import NameOID

from device_sim.se.applet_api import CommandContext
from device_sim.se.jpki_applet import GeneratedKeys, JpkiApplet, KeySource, Profile
from protocol import jpki
from protocol.apdu import CommandAPDU, ResponseAPDU
from protocol.errors import JpkiError, MalformedAPDU, StatusWord

log = structlog.get_logger(__name__)


class PersonalisationFailed(JpkiError):
    """The factory line got an unexpected answer from the applet or the issuer."""


@dataclass(frozen=True, slots=True)
class CardHolder:
    """The four basic facts and where the holder lives (the signing certificate's subject)."""

    name: str
    date_of_birth: dt.date
    sex: str  # "1" male, "2" female, "3" unknown (basic-residents register codes)
    address: str
    prefecture: str
    city: str


@dataclass(frozen=True, slots=True)
class CardCertificateRequest:
    holder: CardHolder
    auth_public_key: rsa.RSAPublicKey
    sign_public_key: rsa.RSAPublicKey


@dataclass(frozen=True, slots=True)
class CardCertificates:
    """DER certificates for the four certificate EFs."""

    auth_certificate: bytes
    auth_ca_certificate: bytes
    sign_certificate: bytes
    sign_ca_certificate: bytes


class CardIssuer(Protocol):
    def __call__(self, request: CardCertificateRequest) -> CardCertificates: ...


# --- the card ------------------------------------------------------------------------------


@dataclass(eq=False)
class MyNumberCard:
    """ISO 7816 card with one application (JPKI). The contactless link is ``transmit``."""

    applet: JpkiApplet = field(repr=False)
    atr: bytes = jpki.CARD_ATR
    _application_selected: bool = field(default=False, repr=False)

    def reset(self) -> bytes:
        """Power-up or warm reset: the MF is current again, every PIN logged out."""
        self._application_selected = False
        self.applet.on_deselect()
        return self.atr

    def transmit(self, apdu: bytes) -> bytes:
        try:
            command = CommandAPDU.from_bytes(apdu)
        except MalformedAPDU:
            return ResponseAPDU.status(StatusWord.WRONG_LENGTH).to_bytes()
        return self.process(command).to_bytes()

    def process(self, command: CommandAPDU) -> ResponseAPDU:
        if command.ins == jpki.INS_SELECT and command.cla == 0x00 and command.p1 == 0x04:
            if command.data != self.applet.aid:
                return ResponseAPDU.status(StatusWord.FILE_NOT_FOUND)
            self._application_selected = True
            return self.applet.on_select()
        if not self._application_selected:
            # Only the MF is current: the card has no EFs of its own that we model.
            if command.ins == jpki.INS_SELECT:
                return ResponseAPDU.status(StatusWord.FILE_NOT_FOUND)
            return ResponseAPDU.status(StatusWord.COMMAND_NOT_ALLOWED)
        # No secure channel reaches a card in the field.
        return self.applet.process(command, CommandContext(secure=False))

    def to_state(self) -> dict[str, Any]:
        return {"applet": self.applet.to_state()}

    @classmethod
    def from_state(
        cls, state: dict[str, Any], key_source: KeySource | None = None
    ) -> MyNumberCard:
        return cls(JpkiApplet.from_state(state["applet"], key_source or GeneratedKeys()))


# --- the factory ---------------------------------------------------------------------------

_FACTORY_LINE = CommandContext(secure=True)  # the factory's trusted personalisation line


def _run(applet: JpkiApplet, command: CommandAPDU, what: str) -> bytes:
    response = applet.process(command, _FACTORY_LINE)
    if response.sw != StatusWord.OK:
        raise PersonalisationFailed(f"{what} answered {response.sw:04X}")
    return response.data


def _generate(applet: JpkiApplet, key_ef: jpki.EF, challenge: bytes) -> rsa.RSAPublicKey:
    answer = jpki.parse_generate_key_pair(
        applet.process(jpki.generate_key_pair(key_ef, challenge), _FACTORY_LINE)
    )
    public = load_der_public_key(answer.public_key_der)
    if not isinstance(public, rsa.RSAPublicKey):
        raise PersonalisationFailed("generated key is not RSA")
    public.verify(
        answer.proof,
        jpki.proof_message(key_ef, challenge, answer.public_key_der),
        padding.PKCS1v15(),
        hashes.SHA256(),
    )
    return public


def _set_pin(applet: JpkiApplet, pin_ef: jpki.EF, value: bytes, temporary: bytes) -> None:
    """Set the holder's PIN the way a phone does: temporary PIN, VERIFY, CHANGE."""
    _run(applet, jpki.set_temporary_pin(pin_ef, temporary, jpki.TemporaryPinMode.USABLE),
         "SET TEMPORARY PIN")
    _run(applet, jpki.select_ef(pin_ef), "SELECT PIN EF")
    _run(applet, jpki.verify(temporary), "VERIFY temporary PIN")
    _run(applet, jpki.change_reference_data(value), "CHANGE REFERENCE DATA")


def manufacture_card(
    holder: CardHolder,
    issuer: CardIssuer,
    *,
    auth_pin: str,
    sign_password: str,
    key_source: KeySource | None = None,
    random_bytes: Callable[[int], bytes] = os.urandom,
    profile: Profile = Profile.CARD,
) -> MyNumberCard:
    """Make a personalised card: keys generated in the applet, certificates from ``issuer``.

    ``profile=Profile.PHONE`` makes the same thing with a phone's applet (token, access
    rules), for tools that want to read a phone's JPKI application through a reader.
    """
    auth_value = jpki.AUTH_PIN_RULE.check(auth_pin)
    sign_value = jpki.SIGN_PIN_RULE.check(sign_password)
    applet = JpkiApplet(profile, key_source or GeneratedKeys())
    applet.on_select()
    auth_key = _generate(applet, jpki.EF.AUTH_KEY, random_bytes(32))
    sign_key = _generate(applet, jpki.EF.SIGN_KEY, random_bytes(32))
    certificates = issuer(CardCertificateRequest(holder, auth_key, sign_key))
    for ef, der in (
        (jpki.EF.AUTH_CERT, certificates.auth_certificate),
        (jpki.EF.AUTH_CA_CERT, certificates.auth_ca_certificate),
        (jpki.EF.SIGN_CERT, certificates.sign_certificate),
        (jpki.EF.SIGN_CA_CERT, certificates.sign_ca_certificate),
    ):
        for command in jpki.write_certificate(ef, der):
            _run(applet, command, f"WRITE CERTIFICATE {ef:04X}")
    # Temporary values differ from the final ones, so the CHANGE is a real change.
    auth_temporary = b"%04d" % (int.from_bytes(random_bytes(2), "big") % 10_000)
    sign_temporary = random_bytes(8).hex().upper().encode("ascii")
    _set_pin(applet, jpki.EF.AUTH_PIN, auth_value, auth_temporary)
    _set_pin(applet, jpki.EF.SIGN_PIN, sign_value, sign_temporary)
    applet.on_deselect()
    log.info("card.manufactured")
    return MyNumberCard(applet)


# --- a small test card CA --------------------------------------------------------------------

OID_NAME = x509.ObjectIdentifier("1.2.392.200149.8.5.5.1")
OID_SEX = x509.ObjectIdentifier("1.2.392.200149.8.5.5.3")
OID_DATE_OF_BIRTH = x509.ObjectIdentifier("1.2.392.200149.8.5.5.4")
OID_ADDRESS = x509.ObjectIdentifier("1.2.392.200149.8.5.5.5")
OID_POLICY_SIGNING = x509.ObjectIdentifier("1.2.392.200149.8.5.1.1.20")
OID_POLICY_AUTHENTICATION = x509.ObjectIdentifier("1.2.392.200149.8.5.1.3.30")


def _utf8_der(text: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) < 0x80:
        return b"\x0c" + bytes((len(raw),)) + raw
    width = (len(raw).bit_length() + 7) // 8
    return b"\x0c" + bytes((0x80 | width,)) + len(raw).to_bytes(width, "big") + raw


def _era_date(born: dt.date) -> str:
    """``EYYYYMMDD`` (DOMAIN.md §2): 5 Reiwa, 4 Heisei, 3 Showa, 2 Taisho, 1 Meiji."""
    for start, era in (
        (dt.date(2019, 5, 1), "5"), (dt.date(1989, 1, 8), "4"), (dt.date(1926, 12, 25), "3"),
        (dt.date(1912, 7, 30), "2"),
    ):
        if born >= start:
            return f"{era}{born:%Y%m%d}"
    return f"1{born:%Y%m%d}"


@dataclass(eq=False)
class TestCardCa:
    """Two throw-away single-tier roots (``O=JPKI-TEST``) issuing card certificates.

    Only for the simulated cards of tests and ``jpki card serve``; the JPKI CA worker is
    the real issuer of the system.
    """

    __test__ = False  # not a pytest test class

    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
    validity: dt.timedelta = dt.timedelta(days=5 * 365)
    _keys: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict, repr=False)
    _roots: dict[str, x509.Certificate] = field(default_factory=dict, repr=False)
    _serial: int = 1

    def __post_init__(self) -> None:
        for kind, unit in (("auth", "JPKI for user authentication"),
                           ("sign", "JPKI for digital signature")):
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            name = x509.Name([
                x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "JPKI-TEST"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "jpki-mobile test card CA"),
            ])
            self._keys[kind] = key
            self._roots[kind] = self._builder(name, name, key.public_key()).add_extension(
                x509.BasicConstraints(ca=True, path_length=0), critical=True
            ).add_extension(
                _key_usage(cert_sign=True), critical=True
            ).add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                critical=False,
            ).sign(key, hashes.SHA256())

    def root(self, kind: str) -> x509.Certificate:
        return self._roots[kind]

    def _builder(
        self, subject: x509.Name, issuer: x509.Name, public_key: rsa.RSAPublicKey
    ) -> x509.CertificateBuilder:
        start = self.now()
        self._serial += 1
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(self._serial)
            .not_valid_before(start - dt.timedelta(minutes=5))
            .not_valid_after(start + self.validity)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )

    def _end_entity(
        self,
        kind: str,
        subject: x509.Name,
        public_key: rsa.RSAPublicKey,
        facts: x509.SubjectAlternativeName | None,
    ) -> bytes:
        signing = facts is not None
        root = self._roots[kind]
        builder = self._builder(subject, root.subject, public_key).add_extension(
            _key_usage(non_repudiation=signing), critical=True
        ).add_extension(
            x509.CertificatePolicies([x509.PolicyInformation(
                OID_POLICY_SIGNING if signing else OID_POLICY_AUTHENTICATION, None
            )]),
            critical=False,
        ).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(self._keys[kind].public_key()),
            critical=False,
        )
        if facts is not None:
            builder = builder.add_extension(facts, critical=False)
        return builder.sign(self._keys[kind], hashes.SHA256()).public_bytes(Encoding.DER)

    def __call__(self, request: CardCertificateRequest) -> CardCertificates:
        holder = request.holder
        facts = x509.SubjectAlternativeName([
            x509.OtherName(OID_NAME, _utf8_der(holder.name)),
            x509.OtherName(OID_DATE_OF_BIRTH, _utf8_der(_era_date(holder.date_of_birth))),
            x509.OtherName(OID_SEX, _utf8_der(holder.sex)),
            x509.OtherName(OID_ADDRESS, _utf8_der(holder.address)),
        ])
        serial_tag = f"{self._serial + 1:016X}"
        auth_subject = x509.Name([
            x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"TEST-AUTH-{serial_tag}"),
        ])
        sign_subject = x509.Name([
            x509.NameAttribute(NameOID.COUNTRY_NAME, "JP"),
            x509.NameAttribute(NameOID.LOCALITY_NAME, holder.prefecture),
            x509.NameAttribute(NameOID.LOCALITY_NAME, holder.city),
            x509.NameAttribute(NameOID.COMMON_NAME, f"TEST-SIGN-{serial_tag}"),
        ])
        return CardCertificates(
            auth_certificate=self._end_entity("auth", auth_subject, request.auth_public_key,
                                              None),
            auth_ca_certificate=self._roots["auth"].public_bytes(Encoding.DER),
            sign_certificate=self._end_entity("sign", sign_subject, request.sign_public_key,
                                              facts),
            sign_ca_certificate=self._roots["sign"].public_bytes(Encoding.DER),
        )


def _key_usage(*, cert_sign: bool = False, non_repudiation: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=non_repudiation,
        key_encipherment=False, data_encipherment=False, key_agreement=False,
        key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )

SAMPLE_HOLDER = CardHolder(
    name="試験 花子",
    date_of_birth=dt.date(1990, 4, 1),
    sex="2",
    address="東京都千代田区霞が関1-1",
    prefecture="東京都",
    city="千代田区",
)
