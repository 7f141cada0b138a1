"""The host side of the applet's interface (``protocol/jpki.py``): exact bytes of DOMAIN.md §1,
PIN rules, DigestInfo, and the personalisation encodings."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import jpki
from protocol.apdu import CommandAPDU, ResponseAPDU
from protocol.errors import CardError
from protocol.jpki import EF, TemporaryPinMode


@pytest.mark.parametrize(("command", "wire"), [
    (jpki.select_ap(), "00A4040C0AD392F000260100000001"),
    (jpki.select_ef(EF.AUTH_PIN), "00A4020C020018"),
    (jpki.select_ef(EF.SIGN_KEY), "00A4020C02001A"),
    (jpki.read_binary(0x0104, 256), "00B0010400"),  # Le 256 is encoded 00
    (jpki.read_binary(0, 4), "00B0000004"),
    (jpki.retries_left(), "00200080"),
    (jpki.verify(b"1234"), "002000800431323334"),
    (jpki.change_reference_data(b"5678"), "002401800435363738"),
    (jpki.reset_retry_counter_with_puk(b"12345678", b"9999"),
     "002C00800C" + b"123456789999".hex()),
])
def test_public_apdus_are_the_documented_bytes(command: CommandAPDU, wire: str) -> None:
    assert command.to_bytes().hex().upper() == wire.upper()


def test_compute_digital_signature_bytes() -> None:
    digest_info = jpki.digest_info("sha256", hashlib.sha256(b"abc").digest())
    wire = jpki.compute_digital_signature(digest_info).to_bytes()
    assert wire[:5] == bytes.fromhex("802A008033") and wire[5:-1] == digest_info
    assert wire[-1] == 0x00  # Le 256, as OpenSC sends it
    assert digest_info.hex().startswith("3031300d060960864801650304020105000420")


def test_digest_info_round_trip_and_refusals() -> None:
    for name, size in (("sha1", 20), ("sha224", 28), ("sha256", 32), ("sha384", 48),
                       ("sha512", 64)):
        digest = bytes(range(size))
        assert jpki.parse_digest_info(jpki.digest_info(name, digest)) == (name, digest)
    with pytest.raises(jpki.InvalidDigestInfo):
        jpki.digest_info("md5", bytes(16))
    with pytest.raises(jpki.InvalidDigestInfo):
        jpki.digest_info("sha256", bytes(31))
    with pytest.raises(jpki.InvalidDigestInfo):
        jpki.parse_digest_info(jpki.digest_info("sha256", bytes(32)) + b"\x00")


@pytest.mark.parametrize(("rule", "good", "bad"), [
    (jpki.AUTH_PIN_RULE, ["0000", "1234"], ["123", "12345", "12a4", "", "１２３４"]),
    (jpki.SIGN_PIN_RULE, ["ABC123", "A" * 16, "000000"],
     ["ABC12", "A" * 17, "abc123", "ABC 123", "ABC-123"]),
])
def test_pin_rules(rule: jpki.PinRule, good: list[str], bad: list[str]) -> None:
    for pin in good:
        assert rule.accepts(pin) and rule.accepts(pin.encode()) and rule.check(pin) == pin.encode()
    for pin in bad:
        assert not rule.accepts(pin)
        with pytest.raises(jpki.InvalidPin) as error:
            rule.check(pin)
        assert pin not in str(error.value) or not pin
    assert (jpki.AUTH_PIN_RULE.max_tries, jpki.SIGN_PIN_RULE.max_tries) == (3, 5)
    assert not jpki.AUTH_PIN_RULE.accepts(b"\xff\xfe\xfd\xfc")


def test_token_and_status_helpers() -> None:
    assert jpki.token_bytes("JPKIAPGPSETOKEN") == b"JPKIAPGPSETOKEN" + b" " * 17
    assert jpki.parse_token(jpki.token_bytes(jpki.CARD_TOKEN)) == "JPKIAPICCTOKEN2"
    assert [jpki.tries_from_sw(sw) for sw in (0x63C2, 0x63C0, 0x9000, 0x6984)] == [2, 0, None,
                                                                                  None]
    assert jpki.expect_ok(ResponseAPDU(b"x", 0x9000), "READ") == b"x"
    with pytest.raises(CardError) as error:
        jpki.expect_ok(ResponseAPDU.status(0x63C1), "VERIFY")
    assert error.value.tries_left == 1


def test_personalisation_encodings() -> None:
    command = jpki.set_temporary_pin(EF.SIGN_PIN, b"TEMP42", TemporaryPinMode.PUK, b"12345678")
    assert command.to_bytes().hex().upper() == (
        "8030041B12810654454D5034328208" + b"12345678".hex().upper()
    )
    assert jpki.generate_key_pair(EF.AUTH_KEY, bytes(16)).to_bytes()[:7] == bytes.fromhex(
        "80460017000010"
    )
    assert jpki.block_pin(EF.AUTH_PIN).to_bytes() == bytes.fromhex("80320018")
    assert jpki.unblock_pin(EF.SIGN_PIN).to_bytes() == bytes.fromhex("8034001B")
    assert jpki.transition_pin(EF.SIGN_PIN).to_bytes() == bytes.fromhex("8036001B")
    assert jpki.get_pin_status(EF.AUTH_PIN).to_bytes() == bytes.fromhex("8038001804")
    assert jpki.wipe_keys().to_bytes() == bytes.fromhex("803A0000")
    assert jpki.wipe_keys(EF.SIGN_KEY).to_bytes() == bytes.fromhex("803A001A")
    with pytest.raises(ValueError):
        jpki.set_temporary_pin(EF.SIGN_PIN, b"TEMP42", TemporaryPinMode.USABLE, b"12345678")
    with pytest.raises(ValueError):
        jpki.generate_key_pair(EF.AUTH_PIN, bytes(16))
    with pytest.raises(ValueError):
        jpki.write_certificate(EF.TOKEN, b"\x30\x00")


@given(st.binary(min_size=1, max_size=jpki.MAX_CERTIFICATE), st.integers(1, 255))
def test_chained_certificate_blocks_reassemble(der: bytes, block: int) -> None:
    commands = jpki.write_certificate(EF.AUTH_CA_CERT, der, max_block=block)
    assert b"".join(c.data for c in commands) == der
    assert [c.cla for c in commands] == [0x90] * (len(commands) - 1) + [0x80]
    assert all(not c.needs_extended for c in commands)


@given(st.dictionaries(st.integers(0, 255), st.binary(max_size=300), max_size=5))
def test_tlv_round_trip(values: dict[int, bytes]) -> None:
    encoded = b"".join(jpki.encode_tlv(tag, value) for tag, value in values.items())
    assert jpki.decode_tlvs(encoded) == values


@pytest.mark.parametrize("data", [b"\x81", b"\x81\x05abc", b"\x81\x83\x00\x00\x01",
                                  b"\x81\x01a\x81\x01b", b"\x81\x82\x01"])
def test_tlv_refusals(data: bytes) -> None:
    with pytest.raises(jpki.MalformedPersonalisationData):
        jpki.decode_tlvs(data)


def test_pin_status_parsing() -> None:
    status = jpki.PinStatus(jpki.PinState.TEMPORARY_BLOCKED, 5, 5, 0)
    assert jpki.PinStatus.from_bytes(status.to_bytes()) == status
    with pytest.raises(CardError):
        jpki.PinStatus.from_bytes(b"\x02\x05\x05")
    with pytest.raises(CardError):
        jpki.PinStatus.from_bytes(b"\x63\x05\x05\x00")
