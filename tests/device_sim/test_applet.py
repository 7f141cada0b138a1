"""The JPKI applet: every public APDU of DOMAIN.md §1 and every personalisation command."""

from __future__ import annotations

import hashlib
import itertools
import json

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key
from hypothesis import given, settings
from hypothesis import strategies as st

from device_sim.card import SAMPLE_HOLDER, CardCertificateRequest, TestCardCa
from device_sim.se.applet_api import CommandContext
from device_sim.se.jpki_applet import (
    GeneratedKeys,
    JpkiApplet,
    JpkiAppletFactory,
    PooledKeys,
    Profile,
)
from device_sim.se.pin import Pin
from protocol import jpki
from protocol.apdu import CommandAPDU, ResponseAPDU
from protocol.jpki import EF, PinState, TemporaryPinMode

SECURE = CommandContext(secure=True, security_level=0x33)
PLAIN = CommandContext(secure=False)
CHALLENGE = bytes(range(32))


class KeyList:
    """Test key source: a fixed list of real RSA-2048 keys, handed out in turn."""

    def __init__(self, keys: list[rsa.RSAPrivateKey]) -> None:
        self._keys = itertools.cycle(keys)

    def new_key(self) -> rsa.RSAPrivateKey:
        return next(self._keys)


@pytest.fixture(scope="module")
def keys() -> list[rsa.RSAPrivateKey]:
    return [GeneratedKeys().new_key() for _ in range(3)]


@pytest.fixture(scope="module")
def ca() -> TestCardCa:
    return TestCardCa()


@pytest.fixture
def phone(keys: list[rsa.RSAPrivateKey]) -> JpkiApplet:
    applet = JpkiApplet(Profile.PHONE, KeyList(keys))
    applet.on_select()
    return applet


def send(applet: JpkiApplet, command: CommandAPDU, context: CommandContext = PLAIN) -> ResponseAPDU:
    return applet.process(command, context)


def sw(applet: JpkiApplet, command: CommandAPDU, context: CommandContext = PLAIN) -> int:
    return send(applet, command, context).sw


def generate(applet: JpkiApplet, key_ef: EF) -> rsa.RSAPublicKey:
    answer = jpki.parse_generate_key_pair(
        send(applet, jpki.generate_key_pair(key_ef, CHALLENGE), SECURE)
    )
    public = load_der_public_key(answer.public_key_der)
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(
        answer.proof, jpki.proof_message(key_ef, CHALLENGE, answer.public_key_der),
        padding.PKCS1v15(), hashes.SHA256(),
    )
    return public


def personalise(
    applet: JpkiApplet,
    ca: TestCardCa,
    mode: TemporaryPinMode = TemporaryPinMode.USABLE,
    auth_temp: bytes = b"4321",
    sign_temp: bytes = b"TEMP99",
) -> dict[EF, bytes]:
    """What the SP-TSM does in FLOWS steps 8 and 10, with the test card CA as issuer."""
    auth_key = generate(applet, EF.AUTH_KEY)
    sign_key = generate(applet, EF.SIGN_KEY)
    certs = ca(CardCertificateRequest(SAMPLE_HOLDER, auth_key, sign_key))
    files = {
        EF.AUTH_CERT: certs.auth_certificate, EF.AUTH_CA_CERT: certs.auth_ca_certificate,
        EF.SIGN_CERT: certs.sign_certificate, EF.SIGN_CA_CERT: certs.sign_ca_certificate,
    }
    for ef, der in files.items():
        for command in jpki.write_certificate(ef, der, max_block=200):
            assert sw(applet, command, SECURE) == 0x9000
    puk = b"12345678" if mode is TemporaryPinMode.PUK else None
    assert sw(applet, jpki.set_temporary_pin(EF.AUTH_PIN, auth_temp, mode, puk), SECURE) == 0x9000
    assert sw(applet, jpki.set_temporary_pin(EF.SIGN_PIN, sign_temp, mode, puk), SECURE) == 0x9000
    assert sw(applet, jpki.set_owner_reference("person-42"), SECURE) == 0x9000
    applet.on_select()
    return files


def read_ef(applet: JpkiApplet, ef: EF, chunk: int = 256) -> bytes:
    assert sw(applet, jpki.select_ef(ef)) == 0x9000
    out = b""
    while True:
        response = send(applet, jpki.read_binary(len(out), chunk))
        if response.sw == 0x6B00:
            return out
        assert response.sw == 0x9000, hex(response.sw)
        out += response.data


def set_user_pin(applet: JpkiApplet, pin_ef: EF, temp: bytes, new: bytes) -> None:
    assert sw(applet, jpki.select_ef(pin_ef)) == 0x9000
    assert sw(applet, jpki.verify(temp)) == 0x9000
    assert sw(applet, jpki.change_reference_data(new)) == 0x9000


def sign(applet: JpkiApplet, key_ef: EF, message: bytes = b"login challenge") -> ResponseAPDU:
    assert sw(applet, jpki.select_ef(key_ef)) == 0x9000
    return send(applet, jpki.compute_digital_signature(
        jpki.digest_info("sha256", hashlib.sha256(message).digest())
    ))


# --- SELECT -------------------------------------------------------------------------------


def test_select_ap_by_aid_and_unknown_aid(phone: JpkiApplet) -> None:
    assert sw(phone, jpki.select_ap()) == 0x9000
    assert sw(phone, CommandAPDU(0x00, 0xA4, 0x04, 0x0C, bytes(10))) == 0x6A82


def test_select_ef_rules(phone: JpkiApplet) -> None:
    assert sw(phone, jpki.select_ef(EF.TOKEN)) == 0x9000
    assert sw(phone, jpki.select_ef(EF.AUTH_PIN)) == 0x9000
    assert sw(phone, jpki.select_ef(0x1234)) == 0x6A82
    assert sw(phone, jpki.select_ef(EF.AUTH_CERT)) == 0x6A82  # nothing written yet
    assert sw(phone, jpki.select_ef(EF.AUTH_KEY)) == 0x6A82  # no key generated yet
    assert sw(phone, CommandAPDU(0x00, 0xA4, 0x02, 0x0C, b"\x00")) == 0x6700
    assert sw(phone, CommandAPDU(0x00, 0xA4, 0x02, 0x04, b"\x00\x06")) == 0x6A86
    assert sw(phone, CommandAPDU(0x00, 0xA4, 0x01, 0x0C, b"\x00\x06")) == 0x6A86


# --- READ BINARY -----------------------------------------------------------------------------


@pytest.mark.parametrize(("profile", "token"), [(Profile.PHONE, b"JPKIAPGPSETOKEN"),
                                                 (Profile.CARD, b"JPKIAPICCTOKEN2")])
def test_token_is_32_bytes_space_padded(profile: Profile, token: bytes) -> None:
    applet = JpkiApplet(profile)
    applet.on_select()
    content = read_ef(applet, EF.TOKEN)
    assert content == token + b" " * (32 - len(token))
    assert jpki.parse_token(content) == token.decode()


def test_read_binary_offsets_le_and_errors(phone: JpkiApplet, ca: TestCardCa) -> None:
    files = personalise(phone, ca)
    ca_cert = files[EF.AUTH_CA_CERT]
    assert sw(phone, jpki.select_ef(EF.AUTH_CA_CERT)) == 0x9000
    # OpenSC reads 4 bytes first to learn the size from the DER header.
    head = send(phone, jpki.read_binary(0, 4)).data
    assert (head[2] << 8 | head[3]) + 4 == len(ca_cert)
    assert send(phone, jpki.read_binary(100, 17)).data == ca_cert[100:117]
    # Le=256 (encoded 00) and an extended Le.
    assert send(phone, CommandAPDU.from_bytes(bytes.fromhex("00B0000000"))).data == ca_cert[:256]
    assert send(phone, jpki.read_binary(0, 4096)).data == ca_cert
    # Near the end fewer bytes than Le come back; past the end is 6B00.
    tail = send(phone, jpki.read_binary(len(ca_cert) - 3, 256))
    assert (tail.sw, tail.data) == (0x9000, ca_cert[-3:])
    assert sw(phone, jpki.read_binary(len(ca_cert), 1)) == 0x6B00
    assert sw(phone, CommandAPDU(0x00, 0xB0, 0x00, 0x00)) == 0x6700  # no Le
    assert sw(phone, CommandAPDU(0x00, 0xB0, 0x81, 0x00, le=4)) == 0x6A86  # SFI addressing
    assert read_ef(phone, EF.SIGN_CA_CERT, chunk=100) == files[EF.SIGN_CA_CERT]
    assert sw(phone, jpki.select_ef(EF.AUTH_PIN)) == 0x9000
    assert sw(phone, jpki.read_binary(0, 4)) == 0x6986  # a PIN is not readable


def test_phone_auth_certificate_only_after_auth_pin(phone: JpkiApplet, ca: TestCardCa) -> None:
    files = personalise(phone, ca)
    assert sw(phone, jpki.select_ef(EF.AUTH_CERT)) == 0x9000
    assert sw(phone, jpki.read_binary(0, 4)) == 0x6982
    assert sw(phone, jpki.select_ef(EF.AUTH_PIN)) == 0x9000
    assert sw(phone, jpki.verify(b"4321")) == 0x9000
    assert read_ef(phone, EF.AUTH_CERT) == files[EF.AUTH_CERT]
    phone.on_select()  # logout
    assert sw(phone, jpki.select_ef(EF.AUTH_CERT)) == 0x9000
    assert sw(phone, jpki.read_binary(0, 4)) == 0x6982


def test_card_auth_certificate_free_signing_certificate_after_password(
    keys: list[rsa.RSAPrivateKey], ca: TestCardCa
) -> None:
    card = JpkiApplet(Profile.CARD, KeyList(keys))
    files = personalise(card, ca)
    assert read_ef(card, EF.AUTH_CERT) == files[EF.AUTH_CERT]
    assert sw(card, jpki.select_ef(EF.SIGN_CERT)) == 0x9000
    assert sw(card, jpki.read_binary(0, 4)) == 0x6982
    assert sw(card, jpki.select_ef(EF.SIGN_PIN)) == 0x9000
    assert sw(card, jpki.verify(b"TEMP99")) == 0x9000
    assert read_ef(card, EF.SIGN_CERT) == files[EF.SIGN_CERT]


# --- VERIFY, empty VERIFY, CHANGE REFERENCE DATA ----------------------------------------------


def test_empty_verify_counts_without_spending(phone: JpkiApplet, ca: TestCardCa) -> None:
    personalise(phone, ca)
    assert sw(phone, jpki.select_ef(EF.SIGN_PIN)) == 0x9000
    for _ in range(3):
        assert sw(phone, jpki.retries_left()) == 0x63C5
    assert sw(phone, jpki.select_ef(EF.AUTH_PIN)) == 0x9000
    assert sw(phone, jpki.retries_left()) == 0x63C3


@pytest.mark.parametrize(("pin_ef", "good", "bad", "tries"), [
    (EF.AUTH_PIN, b"4321", b"0000", 3),
    (EF.SIGN_PIN, b"TEMP99", b"WRONG1", 5),
])
def test_wrong_pins_count_down_then_block(
    phone: JpkiApplet, ca: TestCardCa, pin_ef: EF, good: bytes, bad: bytes, tries: int
) -> None:
    personalise(phone, ca)
    assert sw(phone, jpki.select_ef(pin_ef)) == 0x9000
    assert sw(phone, jpki.verify(bad)) == 0x63C0 | (tries - 1)
    assert sw(phone, jpki.verify(good)) == 0x9000  # a success restores the counter
    for left in range(tries - 1, -1, -1):
        assert sw(phone, jpki.verify(bad)) == 0x63C0 | left
    assert sw(phone, jpki.verify(good)) == 0x6984  # blocked: even the right PIN
    assert sw(phone, jpki.retries_left()) == 0x63C0
    assert phone.pin_status(pin_ef).state is PinState.EXHAUSTED


def test_verify_needs_a_pin_ef_and_right_p1p2(phone: JpkiApplet, ca: TestCardCa) -> None:
    personalise(phone, ca)
    assert sw(phone, jpki.verify(b"4321")) == 0x6986  # nothing selected after SELECT AP
    assert sw(phone, jpki.select_ef(EF.AUTH_PIN)) == 0x9000
    assert sw(phone, CommandAPDU(0x00, 0x20, 0x00, 0x81, b"4321")) == 0x6A86


def test_change_reference_data_right_after_verify(phone: JpkiApplet, ca: TestCardCa) -> None:
    personalise(phone, ca)
    assert sw(phone, jpki.select_ef(EF.AUTH_PIN)) == 0x9000
    assert sw(phone, jpki.change_reference_data(b"5555")) == 0x6982  # no VERIFY
    assert sw(phone, jpki.verify(b"4321")) == 0x9000
    assert sw(phone, jpki.retries_left()) == 0x63C3  # another command in between ...
    assert sw(phone, jpki.change_reference_data(b"5555")) == 0x6982  # ... so not "right after"
    assert sw(phone, jpki.verify(b"4321")) == 0x9000
    assert sw(phone, jpki.change_reference_data(b"55555")) == 0x6A80  # breaks the 4-digit rule
    assert sw(phone, jpki.verify(b"4321")) == 0x9000
    assert sw(phone, CommandAPDU(0x00, 0x24, 0x00, 0x80, b"5555")) == 0x6A86
    assert sw(phone, jpki.verify(b"4321")) == 0x9000
    assert sw(phone, CommandAPDU(0x00, 0x24, 0x01, 0x80)) == 0x6700
    assert sw(phone, jpki.verify(b"4321")) == 0x9000
    assert sw(phone, jpki.change_reference_data(b"5555")) == 0x9000
    assert phone.pin_status(EF.AUTH_PIN).state is PinState.SET
    phone.on_select()
    assert sw(phone, jpki.select_ef(EF.AUTH_PIN)) == 0x9000
    assert sw(phone, jpki.verify(b"4321")) == 0x63C2
    assert sw(phone, jpki.verify(b"5555")) == 0x9000


# --- COMPUTE DIGITAL SIGNATURE ---------------------------------------------------------------


@pytest.mark.parametrize(("key_ef", "pin_ef", "pin", "cert_ef"), [
    (EF.AUTH_KEY, EF.AUTH_PIN, b"4321", EF.AUTH_CERT),
    (EF.SIGN_KEY, EF.SIGN_PIN, b"TEMP99", EF.SIGN_CERT),
])
def test_signature_verifies_with_the_certificate(
    phone: JpkiApplet, ca: TestCardCa, key_ef: EF, pin_ef: EF, pin: bytes, cert_ef: EF
) -> None:
    files = personalise(phone, ca)
    assert sign(phone, key_ef).sw == 0x6982  # no VERIFY yet
    assert sw(phone, jpki.select_ef(pin_ef)) == 0x9000
    assert sw(phone, jpki.verify(pin)) == 0x9000
    response = sign(phone, key_ef, b"message")
    assert response.sw == 0x9000 and len(response.data) == 256
    public = x509.load_der_x509_certificate(files[cert_ef]).public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(response.data, b"message", padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(InvalidSignature):
        public.verify(response.data, b"other", padding.PKCS1v15(), hashes.SHA256())
    # The other key's PIN was not verified.
    other = EF.SIGN_KEY if key_ef is EF.AUTH_KEY else EF.AUTH_KEY
    assert sign(phone, other).sw == 0x6982
    phone.on_select()  # logout by re-SELECT
    assert sign(phone, key_ef).sw == 0x6982


def test_signature_preconditions(phone: JpkiApplet, ca: TestCardCa) -> None:
    personalise(phone, ca)
    assert sw(phone, jpki.select_ef(EF.AUTH_PIN)) == 0x9000
    assert sw(phone, jpki.verify(b"4321")) == 0x9000
    digest = jpki.digest_info("sha256", bytes(32))
    assert sw(phone, jpki.compute_digital_signature(digest)) == 0x6985  # PIN EF selected
    assert sw(phone, jpki.select_ef(EF.AUTH_KEY)) == 0x9000
    assert sw(phone, jpki.compute_digital_signature(b"\x01" * 51)) == 0x6A80  # not a DigestInfo
    assert sw(phone, CommandAPDU(0x80, 0x2A, 0x9E, 0x9A, digest, le=256)) == 0x6A86
    for name, size in (("sha1", 20), ("sha384", 48), ("sha512", 64)):
        assert sw(phone, jpki.compute_digital_signature(jpki.digest_info(name, bytes(size)))) \
            == 0x9000


def test_unknown_instructions_and_classes(phone: JpkiApplet) -> None:
    assert sw(phone, CommandAPDU(0x00, 0xCA, 0x00, 0x00, le=0x10)) == 0x6D00
    assert sw(phone, CommandAPDU(0x80, 0x99, 0x00, 0x00)) == 0x6D00
    assert sw(phone, CommandAPDU(0x20, 0xB0, 0x00, 0x00, le=4)) == 0x6E00


# --- personalisation commands ---------------------------------------------------------------

PERSONALISATION = [
    jpki.generate_key_pair(EF.AUTH_KEY, CHALLENGE),
    *jpki.write_certificate(EF.AUTH_CA_CERT, b"\x30\x03\x02\x01\x01"),
    jpki.set_temporary_pin(EF.AUTH_PIN, b"1111", TemporaryPinMode.USABLE),
    jpki.block_pin(EF.AUTH_PIN),
    jpki.unblock_pin(EF.AUTH_PIN),
    jpki.transition_pin(EF.AUTH_PIN),
    jpki.get_pin_status(EF.AUTH_PIN),
    jpki.wipe_keys(),
    jpki.set_owner_reference("someone"),
]


@pytest.mark.parametrize("command", PERSONALISATION, ids=lambda c: f"{c.ins:02X}")
@pytest.mark.parametrize("profile", list(Profile))
def test_personalisation_refused_outside_the_secure_channel(
    profile: Profile, command: CommandAPDU, ca: TestCardCa, keys: list[rsa.RSAPrivateKey]
) -> None:
    applet = JpkiApplet(profile, KeyList(keys))
    personalise(applet, ca)
    before = json.dumps(applet.to_state(), sort_keys=True)
    assert sw(applet, command, PLAIN) == 0x6982
    assert json.dumps(applet.to_state(), sort_keys=True) == before  # nothing changed


def test_generate_key_pair_proof_and_public_key(phone: JpkiApplet) -> None:
    public = generate(phone, EF.AUTH_KEY)
    assert public.key_size == 2048 and public.public_numbers().e == 65537
    assert phone.holds_keys()
    assert phone.public_key(EF.AUTH_KEY).public_numbers() == public.public_numbers()
    answer = jpki.parse_generate_key_pair(
        send(phone, jpki.generate_key_pair(EF.SIGN_KEY, CHALLENGE), SECURE)
    )
    # The proof binds the challenge and the key slot: a replayed or relabelled proof fails.
    sign_public = load_der_public_key(answer.public_key_der)
    with pytest.raises(InvalidSignature):
        sign_public.verify(answer.proof,
                           jpki.proof_message(EF.AUTH_KEY, CHALLENGE, answer.public_key_der),
                           padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(InvalidSignature):
        sign_public.verify(answer.proof,
                           jpki.proof_message(EF.SIGN_KEY, bytes(32), answer.public_key_der),
                           padding.PKCS1v15(), hashes.SHA256())
    assert sw(phone, CommandAPDU(0x80, 0x46, 0x00, 0x18, CHALLENGE), SECURE) == 0x6A86
    assert sw(phone, CommandAPDU(0x80, 0x46, 0x00, 0x17, bytes(8)), SECURE) == 0x6700


def test_regenerating_a_key_drops_its_certificate(phone: JpkiApplet, ca: TestCardCa) -> None:
    personalise(phone, ca)
    generate(phone, EF.SIGN_KEY)
    assert EF.SIGN_CERT not in phone.files and EF.AUTH_CERT in phone.files


def test_write_certificate_extended_and_chained(phone: JpkiApplet, ca: TestCardCa) -> None:
    auth_key = generate(phone, EF.AUTH_KEY)
    sign_key = generate(phone, EF.SIGN_KEY)
    certs = ca(CardCertificateRequest(SAMPLE_HOLDER, auth_key, sign_key))
    # A 2 KB-class certificate as one extended APDU, another as a chain of short blocks.
    (single,) = jpki.write_certificate(EF.SIGN_CERT, certs.sign_certificate)
    assert single.needs_extended
    assert sw(phone, single, SECURE) == 0x9000
    chain = jpki.write_certificate(EF.AUTH_CERT, certs.auth_certificate, max_block=255)
    assert len(chain) > 1 and all(c.cla == 0x90 for c in chain[:-1]) and chain[-1].cla == 0x80
    for command in chain:
        assert sw(phone, command, SECURE) == 0x9000
    assert phone.files[EF.AUTH_CERT] == certs.auth_certificate
    assert phone.files[EF.SIGN_CERT] == certs.sign_certificate


def test_write_certificate_refusals(phone: JpkiApplet, ca: TestCardCa) -> None:
    auth_key = generate(phone, EF.AUTH_KEY)
    sign_key = generate(phone, EF.SIGN_KEY)
    certs = ca(CardCertificateRequest(SAMPLE_HOLDER, auth_key, sign_key))
    wrong_slot = jpki.write_certificate(EF.AUTH_CERT, certs.sign_certificate)[0]
    assert sw(phone, wrong_slot, SECURE) == 0x6A80  # certificate of another key
    assert sw(phone, CommandAPDU(0x80, 0xD6, 0x00, 0x17, b"\x30\x00"), SECURE) == 0x6A86
    assert sw(phone, CommandAPDU(0x80, 0xD6, 0x00, 0x0B, b"not DER"), SECURE) == 0x6A80
    too_big = CommandAPDU(0x80, 0xD6, 0x00, 0x0B, bytes(4097), extended=True)
    assert sw(phone, too_big, SECURE) == 0x6A84
    # An interrupted chain is forgotten: the final block alone is not a certificate.
    blocks = jpki.write_certificate(EF.AUTH_CA_CERT, certs.auth_ca_certificate, max_block=200)
    assert sw(phone, blocks[0], SECURE) == 0x9000
    assert sw(phone, jpki.get_pin_status(EF.AUTH_PIN), SECURE) == 0x9000
    assert sw(phone, blocks[-1], SECURE) == 0x6A80
    fresh = JpkiApplet(Profile.PHONE)
    assert sw(fresh, jpki.write_certificate(EF.AUTH_CERT, certs.auth_certificate)[0], SECURE) \
        == 0x6985  # no key to certify


def test_set_temporary_pin_checks_format_and_parameters(phone: JpkiApplet) -> None:
    assert phone.pin_status(EF.AUTH_PIN).state is PinState.NOT_SET
    assert sw(phone, jpki.select_ef(EF.AUTH_PIN)) == 0x9000
    assert sw(phone, jpki.retries_left()) == 0x6A88  # no PIN yet
    assert sw(phone, jpki.verify(b"1234")) == 0x6A88
    cases = [
        (jpki.set_temporary_pin(EF.AUTH_PIN, b"12345", TemporaryPinMode.USABLE), 0x6A80),
        (jpki.set_temporary_pin(EF.SIGN_PIN, b"abc123", TemporaryPinMode.USABLE), 0x6A80),
        (jpki.set_temporary_pin(EF.AUTH_PIN, b"1234", TemporaryPinMode.PUK, b"123"), 0x6A80),
        (CommandAPDU(0x80, 0x30, 0x09, 0x18, b"\x81\x041234"), 0x6A86),
        (CommandAPDU(0x80, 0x30, 0x01, 0x17, b"\x81\x041234"), 0x6A86),
        (CommandAPDU(0x80, 0x30, 0x01, 0x18, b"\x81\x091234"), 0x6A80),  # TLV runs past data
        (CommandAPDU(0x80, 0x30, 0x01, 0x18, b"\x83\x041234"), 0x6A80),  # no PIN tag
        (CommandAPDU(0x80, 0x30, 0x01, 0x18, b"\x81\x041234\x82\x0812345678"), 0x6A80),  # PUK
    ]
    for command, expected in cases:
        assert sw(phone, command, SECURE) == expected, command
    assert phone.pin_status(EF.AUTH_PIN).state is PinState.NOT_SET


def test_get_pin_status_answer(phone: JpkiApplet) -> None:
    sw_ok = sw(phone, jpki.set_temporary_pin(EF.SIGN_PIN, b"ABCDEF", TemporaryPinMode.PUK,
                                              b"87654321"), SECURE)
    assert sw_ok == 0x9000
    status = jpki.PinStatus.from_bytes(send(phone, jpki.get_pin_status(EF.SIGN_PIN), SECURE).data)
    assert status == jpki.PinStatus(PinState.PUK_LOCKED, 5, 5, 10)
    assert sw(phone, CommandAPDU(0x80, 0x38, 0x00, 0x17, le=4), SECURE) == 0x6A86


def test_wipe_keys_one_or_all(phone: JpkiApplet, ca: TestCardCa) -> None:
    personalise(phone, ca)
    assert phone.owner_reference() == "person-42"
    assert sw(phone, jpki.wipe_keys(EF.SIGN_KEY), SECURE) == 0x9000
    assert phone.public_key(EF.SIGN_KEY) is None and EF.SIGN_CERT not in phone.files
    assert phone.pin_status(EF.SIGN_PIN).state is PinState.NOT_SET
    assert phone.holds_keys() and phone.owner_reference() == "person-42"
    assert sw(phone, jpki.wipe_keys(), SECURE) == 0x9000
    assert not phone.holds_keys() and phone.owner_reference() is None
    assert EF.AUTH_CERT not in phone.files and EF.AUTH_CA_CERT in phone.files
    assert sw(phone, jpki.select_ef(EF.AUTH_KEY)) == 0x6A82  # the key EF is gone
    assert sw(phone, CommandAPDU(0x80, 0x3A, 0x00, 0x18), SECURE) == 0x6A86


def test_owner_reference(phone: JpkiApplet) -> None:
    assert phone.owner_reference() is None
    assert sw(phone, jpki.set_owner_reference("人-1"), SECURE) == 0x9000
    assert phone.owner_reference() == "人-1"
    assert sw(phone, CommandAPDU(0x80, 0x3C, 0x00, 0x00, b"\xff\xfe"), SECURE) == 0x6A80
    assert sw(phone, CommandAPDU(0x80, 0x3C, 0x00, 0x00, bytes(65)), SECURE) == 0x6700
    assert sw(phone, CommandAPDU(0x80, 0x3C, 0x01, 0x00, b"x"), SECURE) == 0x6A86


# --- persistence, factory, key sources, secrets ---------------------------------------------


def test_state_survives_a_restore(phone: JpkiApplet, ca: TestCardCa) -> None:
    files = personalise(phone, ca)
    set_user_pin(phone, EF.AUTH_PIN, b"4321", b"8642")
    assert sw(phone, jpki.verify(b"0000")) == 0x63C2
    state = json.loads(json.dumps(phone.to_state()))  # JSON-serialisable
    factory = JpkiAppletFactory(Profile.PHONE, GeneratedKeys())
    restored = factory.restore(state)
    restored.on_select()
    assert restored.owner_reference() == "person-42"
    assert restored.pin_status(EF.AUTH_PIN) == phone.pin_status(EF.AUTH_PIN)
    assert sw(restored, jpki.select_ef(EF.AUTH_PIN)) == 0x9000
    assert sw(restored, jpki.verify(b"8642")) == 0x9000
    signature = sign(restored, EF.AUTH_KEY, b"after reinstall").data
    public = x509.load_der_x509_certificate(files[EF.AUTH_CERT]).public_key()
    public.verify(signature, b"after reinstall", padding.PKCS1v15(), hashes.SHA256())


def test_factory_installs_a_fresh_applet() -> None:
    applet = JpkiAppletFactory()(jpki.AID, b"")
    assert applet.profile is Profile.PHONE and applet.aid == jpki.AID
    assert not applet.holds_keys() and applet.owner_reference() is None


def test_pooled_keys_are_cached_and_reused(tmp_path, keys) -> None:
    pool = PooledKeys(size=2, directory=tmp_path)
    assert pool.path.exists() and oct(pool.path.stat().st_mode & 0o777) == "0o600"
    drawn = {pool.new_key().private_numbers().p for _ in range(20)}
    assert len(drawn) <= 2
    again = PooledKeys(size=2, directory=tmp_path)  # loads the cached file
    assert {k.private_numbers().p for k in again._keys} == {
        k.private_numbers().p for k in pool._keys
    }
    applet = JpkiApplet(Profile.PHONE, again)
    assert generate(applet, EF.AUTH_KEY).public_numbers().n in {
        k.public_key().public_numbers().n for k in pool._keys
    }


def test_no_secret_in_repr_or_in_responses(phone: JpkiApplet, ca: TestCardCa) -> None:
    personalise(phone, ca)
    text = repr(phone) + repr(phone.pins) + repr(phone.pins[EF.SIGN_PIN])
    assert "4321" not in text and "TEMP99" not in text
    numbers = phone._keys[EF.AUTH_KEY].private_numbers()
    d = numbers.d.to_bytes(256, "big")
    p = numbers.p.to_bytes(128, "big")
    responses = [
        send(phone, jpki.generate_key_pair(EF.AUTH_KEY, CHALLENGE), SECURE).data,
        send(phone, jpki.get_pin_status(EF.AUTH_PIN), SECURE).data,
    ]
    numbers = phone._keys[EF.AUTH_KEY].private_numbers()
    for data in responses:
        for secret in (d, p, numbers.d.to_bytes(256, "big"), numbers.p.to_bytes(128, "big"),
                       b"4321"):
            assert secret not in data


def test_an_unreadable_key_pool_is_rebuilt(tmp_path) -> None:
    pool = PooledKeys(size=1, directory=tmp_path)
    pool.path.write_text("{not json")
    rebuilt = PooledKeys(size=1, directory=tmp_path)
    assert rebuilt.new_key().key_size == 2048
    assert json.loads(pool.path.read_text())["warning"].startswith("pre-generated test keys")


INSTRUCTIONS = [0xA4, 0xB0, 0x20, 0x24, 0x2C, 0x2A, 0x46, 0xD6, 0x30, 0x32, 0x34, 0x36, 0x38,
                0x3A, 0x3C, 0xCA, 0x00]


@settings(max_examples=200, deadline=None)
@given(
    commands=st.lists(
        st.tuples(
            st.sampled_from([0x00, 0x04, 0x0C, 0x10, 0x80, 0x84, 0x90, 0xA0]),
            st.sampled_from(INSTRUCTIONS),
            st.integers(0, 0xFF) | st.sampled_from([0x00, 0x01, 0x02, 0x04]),
            st.integers(0, 0xFF) | st.sampled_from([0x0C, 0x80, 0x17, 0x18, 0x1A, 0x1B]),
            st.binary(max_size=300) | st.sampled_from([b"\x00\x18", b"\x00\x17", b"\x00\x0A"]),
            st.none() | st.integers(1, 65536),
            st.booleans(),
        ),
        max_size=25,
    )
)
def test_any_command_sequence_gets_a_status_word(fuzz_base: JpkiApplet, commands) -> None:
    """Bad input gets a status word, never an exception (both sides of the secure channel)."""
    applet = JpkiApplet(Profile.PHONE, fuzz_base.key_source)
    applet.files = dict(fuzz_base.files)
    applet._keys = dict(fuzz_base._keys)  # keys are immutable: sharing them is safe
    applet.pins = {ef: Pin.from_state(pin.rule, pin.to_state())
                   for ef, pin in fuzz_base.pins.items()}
    applet.on_select()
    for cla, ins, p1, p2, data, le, secure in commands:
        command = CommandAPDU(cla, ins, p1, p2, data, le)
        response = applet.process(command, SECURE if secure else PLAIN)
        assert 0x6100 <= response.sw <= 0x9000
        if not secure and cla & 0x80 and ins not in (0x2A,) and response.sw != 0x6D00:
            assert response.sw == 0x6982  # personalisation outside SCP03


@pytest.fixture(scope="module")
def fuzz_base(keys: list[rsa.RSAPrivateKey], ca: TestCardCa) -> JpkiApplet:
    applet = JpkiApplet(Profile.PHONE, KeyList(keys))
    personalise(applet, ca)
    return applet
