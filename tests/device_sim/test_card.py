"""The My Number Card (factory personalisation, transmit) and the vpcd bridge protocol."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import struct

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.x509.oid import NameOID

from device_sim import vpcd
from device_sim.card import (
    SAMPLE_HOLDER,
    CardCertificates,
    MyNumberCard,
    PersonalisationFailed,
    TestCardCa,
    manufacture_card,
)
from device_sim.se.jpki_applet import Profile
from protocol import jpki
from protocol.apdu import CommandAPDU, ResponseAPDU
from protocol.jpki import EF, PinState

PIN = "2580"
PASSWORD = "SIGN2580X"


@pytest.fixture(scope="module")
def ca() -> TestCardCa:
    return TestCardCa()


@pytest.fixture(scope="module")
def card_state(ca: TestCardCa) -> dict:
    return manufacture_card(SAMPLE_HOLDER, ca, auth_pin=PIN, sign_password=PASSWORD).to_state()


@pytest.fixture
def card(card_state: dict) -> MyNumberCard:
    return MyNumberCard.from_state(json.loads(json.dumps(card_state)))


def tx(card: MyNumberCard, command: CommandAPDU) -> ResponseAPDU:
    return ResponseAPDU.from_bytes(card.transmit(command.to_bytes()))


def read_file(card: MyNumberCard, ef: EF) -> bytes:
    assert tx(card, jpki.select_ef(ef)).ok
    head = tx(card, jpki.read_binary(0, 4)).data
    size = (head[2] << 8 | head[3]) + 4
    out = b""
    while len(out) < size:
        response = tx(card, jpki.read_binary(len(out), min(256, size - len(out))))
        assert response.ok
        out += response.data
    return out


def test_manufactured_card_holds_keys_certificates_and_pins(card: MyNumberCard,
                                                            ca: TestCardCa) -> None:
    assert card.atr == bytes.fromhex("3BE000FF8131FE4514")
    assert tx(card, jpki.select_ap()).ok
    assert tx(card, jpki.select_ef(EF.TOKEN)).ok
    assert jpki.parse_token(tx(card, jpki.read_binary(0, 32)).data) == "JPKIAPICCTOKEN2"
    auth = x509.load_der_x509_certificate(read_file(card, EF.AUTH_CERT))
    auth_ca = x509.load_der_x509_certificate(read_file(card, EF.AUTH_CA_CERT))
    sign_ca = x509.load_der_x509_certificate(read_file(card, EF.SIGN_CA_CERT))
    assert auth.issuer == auth_ca.subject == ca.root("auth").subject
    assert sign_ca.subject == ca.root("sign").subject
    assert auth_ca.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value \
        == "JPKI-TEST"
    auth.verify_directly_issued_by(auth_ca)
    # PINs are the holder's own (state SET), with full counters.
    assert card.applet.pin_status(EF.AUTH_PIN) == jpki.PinStatus(PinState.SET, 3, 3, 0)
    assert card.applet.pin_status(EF.SIGN_PIN) == jpki.PinStatus(PinState.SET, 5, 5, 0)
    # The signing certificate after the password, with the basic facts in subjectAltName.
    assert tx(card, jpki.select_ef(EF.SIGN_PIN)).ok
    assert tx(card, jpki.verify(PASSWORD.encode())).ok
    sign = x509.load_der_x509_certificate(read_file(card, EF.SIGN_CERT))
    sign.verify_directly_issued_by(sign_ca)
    san = sign.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {o.type_id.dotted_string: o.value for o in san.get_values_for_type(x509.OtherName)}
    assert names["1.2.392.200149.8.5.5.1"][2:].decode() == SAMPLE_HOLDER.name
    assert names["1.2.392.200149.8.5.5.4"][2:].decode() == "419900401"
    usage = sign.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.content_commitment


def test_card_signs_over_nfc(card: MyNumberCard) -> None:
    assert tx(card, jpki.select_ap()).ok
    assert tx(card, jpki.select_ef(EF.SIGN_PIN)).ok
    assert tx(card, jpki.verify(PASSWORD.encode())).ok
    signing_cert = x509.load_der_x509_certificate(read_file(card, EF.SIGN_CERT))
    assert tx(card, jpki.select_ef(EF.SIGN_KEY)).ok
    digest = jpki.digest_info("sha256", hashlib.sha256(b"application").digest())
    signature = tx(card, jpki.compute_digital_signature(digest))
    assert signature.ok
    signing_cert.public_key().verify(signature.data, b"application", padding.PKCS1v15(),
                                     hashes.SHA256())


def test_nothing_but_select_ap_before_the_application_is_selected(card: MyNumberCard) -> None:
    assert tx(card, jpki.select_ef(EF.TOKEN)).sw == 0x6A82
    assert tx(card, jpki.read_binary(0, 4)).sw == 0x6986
    assert tx(card, CommandAPDU(0x00, 0xA4, 0x04, 0x0C, bytes(10))).sw == 0x6A82
    assert tx(card, jpki.select_ap()).ok
    assert tx(card, jpki.select_ef(EF.TOKEN)).ok


def test_reset_logs_out_and_deselects(card: MyNumberCard) -> None:
    assert tx(card, jpki.select_ap()).ok
    assert tx(card, jpki.select_ef(EF.AUTH_PIN)).ok
    assert tx(card, jpki.verify(PIN.encode())).ok
    assert card.reset() == card.atr
    assert tx(card, jpki.select_ef(EF.AUTH_KEY)).sw == 0x6A82
    assert tx(card, jpki.select_ap()).ok
    assert tx(card, jpki.select_ef(EF.AUTH_KEY)).ok
    assert tx(card, jpki.compute_digital_signature(jpki.digest_info("sha256", bytes(32)))).sw \
        == 0x6982


def test_no_personalisation_over_nfc(card: MyNumberCard) -> None:
    assert tx(card, jpki.select_ap()).ok
    before = json.dumps(card.to_state(), sort_keys=True)
    for command in (
        jpki.generate_key_pair(EF.SIGN_KEY, bytes(16)),
        jpki.set_temporary_pin(EF.SIGN_PIN, b"NEWPIN1", jpki.TemporaryPinMode.USABLE),
        jpki.unblock_pin(EF.SIGN_PIN),
        jpki.wipe_keys(),
    ):
        assert tx(card, command).sw == 0x6982
    assert json.dumps(card.to_state(), sort_keys=True) == before


def test_malformed_apdu_is_answered_not_raised(card: MyNumberCard) -> None:
    assert card.transmit(b"\x00\xa4") == b"\x67\x00"
    assert card.transmit(b"\x00\xa4\x04\x0c\x0a\xd3") == b"\x67\x00"


def test_factory_refuses_bad_pins_and_a_wrong_issuer(ca: TestCardCa) -> None:
    with pytest.raises(jpki.InvalidPin) as error:
        manufacture_card(SAMPLE_HOLDER, ca, auth_pin="12345", sign_password=PASSWORD)
    assert "12345" not in str(error.value)
    with pytest.raises(jpki.InvalidPin):
        manufacture_card(SAMPLE_HOLDER, ca, auth_pin=PIN, sign_password="short")

    def swapped(request):  # certificates of the wrong keys
        good = ca(request)
        return CardCertificates(good.sign_certificate, good.auth_ca_certificate,
                                good.auth_certificate, good.sign_ca_certificate)

    with pytest.raises(PersonalisationFailed, match="6A80"):
        manufacture_card(SAMPLE_HOLDER, swapped, auth_pin=PIN, sign_password=PASSWORD)


def test_phone_profile_from_the_factory(ca: TestCardCa) -> None:
    phone = manufacture_card(SAMPLE_HOLDER, ca, auth_pin=PIN, sign_password=PASSWORD,
                             profile=Profile.PHONE)
    assert tx(phone, jpki.select_ap()).ok
    assert tx(phone, jpki.select_ef(EF.TOKEN)).ok
    assert jpki.parse_token(tx(phone, jpki.read_binary(0, 32)).data) == "JPKIAPGPSETOKEN"
    assert tx(phone, jpki.select_ef(EF.AUTH_CERT)).ok
    assert tx(phone, jpki.read_binary(0, 4)).sw == 0x6982


# --- vpcd -----------------------------------------------------------------------------------


def test_vpcd_messages(card: MyNumberCard) -> None:
    assert vpcd.handle_message(card, bytes([vpcd.VpcdControl.GET_ATR])) == card.atr
    for control in (vpcd.VpcdControl.POWER_ON, vpcd.VpcdControl.RESET,
                    vpcd.VpcdControl.POWER_OFF):
        assert vpcd.handle_message(card, bytes([control])) is None
    assert vpcd.handle_message(card, b"\x09") is None  # unknown control: ignored
    assert vpcd.handle_message(card, jpki.select_ap().to_bytes()) == b"\x90\x00"
    with pytest.raises(vpcd.VpcdProtocolError):
        vpcd.handle_message(card, b"")
    assert vpcd.frame(b"\x90\x00") == b"\x00\x02\x90\x00"


async def test_vpcd_serve_against_a_fake_reader(card: MyNumberCard) -> None:
    """A stand-in for the vpcd driver: it listens, the card connects and answers."""
    answers: asyncio.Queue[bytes] = asyncio.Queue()
    stop = asyncio.Event()

    async def reader_side(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def ask(payload: bytes, expect_answer: bool = True) -> None:
            writer.write(struct.pack(">H", len(payload)) + payload)
            await writer.drain()
            if expect_answer:
                length = struct.unpack(">H", await reader.readexactly(2))[0]
                await answers.put(await reader.readexactly(length))

        await ask(b"\x01", expect_answer=False)  # power on
        await ask(b"\x04")  # ATR
        await ask(jpki.select_ap().to_bytes())
        await ask(jpki.select_ef(EF.TOKEN).to_bytes())
        await ask(jpki.read_binary(0, 32).to_bytes())
        writer.close()  # pcscd went away: the card must reconnect

    server = await asyncio.start_server(reader_side, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connections = 0

    def connected() -> None:
        nonlocal connections
        connections += 1
        if connections == 2:
            stop.set()

    async with server:
        await asyncio.wait_for(
            vpcd.serve(card, port=port, stop=stop, retry_delay=0.05, on_connected=connected),
            timeout=10,
        )
    got = [answers.get_nowait() for _ in range(answers.qsize())]
    assert got[0] == card.atr
    assert got[1] == b"\x90\x00" and got[2] == b"\x90\x00"
    assert got[3][:-2].rstrip(b" ") == b"JPKIAPICCTOKEN2" and got[3][-2:] == b"\x90\x00"
    assert connections == 2


async def test_card_served_with_the_system_ca(tmp_path, monkeypatch) -> None:
    """``jpki card serve --ca-dir``: the JPKI CA issues and records the card's certificates."""
    from workers.ca.authority import CertificateAuthority
    from workers.ca.keystore import Passphrase
    from workers.ca.profiles import Holder

    monkeypatch.setenv("JPKI_CA_PASSPHRASE", "card-serve-test-passphrase")
    card = await vpcd._manufacture_with_system_ca(tmp_path, PIN, PASSWORD)
    assert tx(card, jpki.select_ap()).ok
    auth = x509.load_der_x509_certificate(read_file(card, EF.AUTH_CERT))
    authority = await CertificateAuthority.open(tmp_path, Passphrase(b"card-serve-test-passphrase"))
    try:
        records = await authority.certificates(holder=Holder.CARD)
        serials = {record.serial for record in records}
        assert f"{auth.serial_number:040X}" in serials and len(records) == 2
    finally:
        await authority.close()
    assert auth.issuer.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "JPKI-TEST"


def test_phone_secure_element_for_the_reader(ca: TestCardCa) -> None:
    """``jpki card serve --phone``: the SE as the SP-TSM's scripts left it, PINs set locally."""
    reader, applet = vpcd.personalised_phone_element(ca, PIN, PASSWORD, os.urandom)
    assert reader.reset() == jpki.CARD_ATR
    assert applet.owner_reference() == "vpcd-phone"
    assert applet.pin_status(EF.AUTH_PIN) == jpki.PinStatus(PinState.SET, 3, 3, 0)
    assert applet.pin_status(EF.SIGN_PIN) == jpki.PinStatus(PinState.SET, 5, 5, 0)

    def send(command: CommandAPDU) -> ResponseAPDU:
        return ResponseAPDU.from_bytes(reader.transmit(command.to_bytes()))

    assert send(jpki.select_ap()).ok
    assert send(jpki.select_ef(EF.TOKEN)).ok
    assert jpki.parse_token(send(jpki.read_binary(0, 32)).data) == "JPKIAPGPSETOKEN"
    assert send(jpki.select_ef(EF.AUTH_CERT)).ok
    assert send(jpki.read_binary(0, 4)).sw == 0x6982
    assert send(jpki.select_ef(EF.AUTH_PIN)).ok
    assert send(jpki.verify(PIN.encode())).ok
    assert send(jpki.select_ef(EF.AUTH_CERT)).ok
    assert send(jpki.read_binary(0, 4)).ok
    assert send(jpki.generate_key_pair(EF.AUTH_KEY, bytes(16))).sw == 0x6982  # no SCP03
