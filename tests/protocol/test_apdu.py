"""ISO 7816-4 APDU codec: the four cases, short and extended, and malformed frames."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.apdu import CommandAPDU, ResponseAPDU
from protocol.errors import JpkiError, MalformedAPDU

AID = bytes.fromhex("D392F000260100000001")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # case 1
        ("00A40000", CommandAPDU(0x00, 0xA4, 0x00, 0x00)),
        # case 2 short: Le 00 means 256
        ("00B0000000", CommandAPDU(0x00, 0xB0, 0x00, 0x00, le=256)),
        ("00B0000010", CommandAPDU(0x00, 0xB0, 0x00, 0x00, le=16)),
        # case 3 short
        ("00A4040C0A" + AID.hex(), CommandAPDU(0x00, 0xA4, 0x04, 0x0C, AID)),
        # case 4 short
        ("00A404000A" + AID.hex() + "00", CommandAPDU(0x00, 0xA4, 0x04, 0x00, AID, le=256)),
        ("002A9E9A03010203FF", CommandAPDU(0x00, 0x2A, 0x9E, 0x9A, b"\x01\x02\x03", le=255)),
        # case 2 extended: 0000 means 65536
        ("00B00000000000", CommandAPDU(0x00, 0xB0, 0x00, 0x00, le=65536, extended=True)),
        ("00B00000000100", CommandAPDU(0x00, 0xB0, 0x00, 0x00, le=256, extended=True)),
        # case 3 extended
        ("80E20000000003AABBCC", CommandAPDU(0x80, 0xE2, 0, 0, b"\xaa\xbb\xcc", extended=True)),
        # case 4 extended
        ("80E20000000003AABBCC0000",
         CommandAPDU(0x80, 0xE2, 0, 0, b"\xaa\xbb\xcc", le=65536, extended=True)),
        ("80E20000000003AABBCC0102",
         CommandAPDU(0x80, 0xE2, 0, 0, b"\xaa\xbb\xcc", le=0x0102, extended=True)),
    ],
)
def test_cases_parse_and_encode(raw, expected):
    parsed = CommandAPDU.from_bytes(bytes.fromhex(raw))
    assert parsed == expected
    assert parsed.to_bytes() == bytes.fromhex(raw)


def test_long_data_switches_to_extended():
    command = CommandAPDU(0x80, 0xE2, 0x00, 0x00, bytes(300), le=256)
    raw = command.to_bytes()
    assert raw[4:7] == b"\x00\x01\x2c" and raw[-2:] == b"\x01\x00"
    again = CommandAPDU.from_bytes(raw)
    assert (again.data, again.le, again.extended) == (bytes(300), 256, True)


def test_large_le_switches_to_extended():
    raw = CommandAPDU(0x00, 0xB0, 0, 0, le=1000).to_bytes()
    assert raw == bytes.fromhex("00B0000000" "03E8")  # noqa: ISC001


def test_max_sizes():
    big = CommandAPDU(0x80, 0xE2, 0, 0, bytes(65535), le=65536)
    assert CommandAPDU.from_bytes(big.to_bytes()).data == bytes(65535)
    with pytest.raises(MalformedAPDU):
        CommandAPDU(0x80, 0xE2, 0, 0, bytes(65536))


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "00A400",  # shorter than the header
        "00A4040C05A000",  # Lc 5, 2 data bytes
        "00A4040C02A0000000",  # Lc 2, 4 bytes follow
        "00B000000000",  # extended prefix, truncated length
        "80E2000000000000",  # extended Lc of zero with trailing bytes
        "80E20000000005AABB",  # extended Lc 5, 2 data bytes
        "80E20000000002AABB00",  # extended Lc 2, one stray byte
    ],
)
def test_malformed_commands_raise_typed_error(raw):
    with pytest.raises(MalformedAPDU):
        CommandAPDU.from_bytes(bytes.fromhex(raw))


@pytest.mark.parametrize(
    "kwargs",
    [{"cla": 256}, {"ins": -1}, {"p1": 0x100}, {"le": 0}, {"le": 65537}],
)
def test_out_of_range_fields_raise_typed_error(kwargs):
    fields = {"cla": 0, "ins": 0xA4, "p1": 0, "p2": 0} | kwargs
    with pytest.raises(MalformedAPDU):
        CommandAPDU(**fields)


def test_errors_are_project_errors():
    assert issubclass(MalformedAPDU, JpkiError)


def test_response_codec():
    response = ResponseAPDU.from_bytes(bytes.fromhex("01029000"))
    assert response == ResponseAPDU(b"\x01\x02", 0x9000)
    assert response.ok and response.sw1 == 0x90 and response.sw2 == 0x00
    assert ResponseAPDU.status(0x63C2).to_bytes() == bytes.fromhex("63C2")
    for raw in (b"", b"\x90"):
        with pytest.raises(MalformedAPDU):
            ResponseAPDU.from_bytes(raw)


def test_repr_hides_data():
    pin = b"1234"
    assert "1234" not in repr(CommandAPDU(0x00, 0x20, 0x00, 0x80, pin))
    assert "31323334" not in repr(CommandAPDU(0x00, 0x20, 0x00, 0x80, pin)).upper()
    assert "1234" not in repr(ResponseAPDU(pin, 0x9000))


_commands = st.builds(
    CommandAPDU,
    cla=st.integers(0, 255), ins=st.integers(0, 255), p1=st.integers(0, 255),
    p2=st.integers(0, 255),
    data=st.one_of(st.binary(max_size=255), st.binary(min_size=256, max_size=700)),
    le=st.one_of(st.none(), st.integers(1, 256), st.integers(257, 65536)),
    extended=st.booleans(),
)


@given(_commands)
def test_round_trip(command):
    raw = command.to_bytes()
    again = CommandAPDU.from_bytes(raw)
    assert (again.cla, again.ins, again.p1, again.p2, again.data, again.le) == (
        command.cla, command.ins, command.p1, command.p2, command.data, command.le,
    )
    assert again.to_bytes() == raw


@given(st.binary(max_size=40))
def test_arbitrary_bytes_parse_or_raise_typed(raw):
    try:
        CommandAPDU.from_bytes(raw)
    except MalformedAPDU:
        pass
