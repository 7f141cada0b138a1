"""BER-TLV codec: known encodings, round trips, malformed input as typed errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import MalformedTLV
from protocol.tlv import (
    MAX_DEPTH,
    Tlv,
    build,
    decode,
    decode_one,
    encode,
    encode_length,
    encode_tag,
    find,
    find_all,
    validate,
)

# A GET STATUS (GP §11.4.3, tag-list format) response for two applications.
GET_STATUS = bytes.fromhex(
    "E3124F07A0000001515350" "9F700107" "C5039E0000"  # noqa: ISC001
    "E3134F08A000000151000000" "9F70010F" "C5039E0000"
)


def test_known_encodings():
    assert encode(0x4F, bytes.fromhex("A0000001515350")) == bytes.fromhex("4F07A0000001515350")
    assert encode(0x9F70, b"\x07") == bytes.fromhex("9F700107")
    assert encode_length(0x7F) == b"\x7f"
    assert encode_length(0x80) == b"\x81\x80"
    assert encode_length(0xFF) == b"\x81\xff"
    assert encode_length(0x100) == b"\x82\x01\x00"
    assert encode_length(0x10000) == b"\x83\x01\x00\x00"
    assert encode_tag(0x5F2D) == b"\x5f\x2d"
    assert encode_tag(0xBF0C) == b"\xbf\x0c"


def test_get_status_response_parses():
    entries = decode(GET_STATUS)
    assert [e.tag for e in entries] == [0xE3, 0xE3]
    assert entries[0].constructed
    aid = entries[1].find(0x4F)
    assert aid is not None and aid.value == bytes.fromhex("A000000151000000")
    assert [t.value for t in find_all(entries, 0x9F70)] == [b"\x07", b"\x0f"]
    assert find(entries, 0xC5).value == bytes.fromhex("9E0000")
    assert find(entries, 0x42) is None
    assert b"".join(e.to_bytes() for e in entries) == GET_STATUS


def test_long_form_and_nesting():
    inner = Tlv(0x04, bytes(300))
    outer = build(0x30, inner, encode(0x02, b"\x01"))
    raw = outer.to_bytes()
    assert raw[:4] == bytes.fromhex("3082") + (len(outer.value)).to_bytes(2, "big")
    parsed = decode_one(raw)
    assert parsed.children[0] == inner
    assert parsed.find(0x02).value == b"\x01"


def test_non_minimal_length_is_read():
    assert decode_one(bytes.fromhex("04810101")).value == b"\x01"


@pytest.mark.parametrize(
    "raw",
    [
        "",  # decode_one needs one object
        "4F",  # no length
        "4F05A000",  # value shorter than announced
        "4F80",  # indefinite length
        "4F85000000000001",  # five length bytes
        "4F8201",  # truncated long length
        "9F",  # multi-byte tag, no second byte
        "9F80",  # multi-byte tag that never ends
        "9F8080808001",  # tag longer than four bytes
        "0001AA",  # '00' is not a tag
        "FF01AA",  # 'FF' is not a tag
        "4F01AA00",  # trailing byte after the object
    ],
)
def test_malformed_raises_typed_error(raw):
    with pytest.raises(MalformedTLV):
        decode_one(bytes.fromhex(raw))


def test_primitive_has_no_children():
    with pytest.raises(MalformedTLV):
        _ = Tlv(0x4F, b"\x01").children
    with pytest.raises(MalformedTLV):
        build(0x4F, Tlv(0x50, b""))


def test_nesting_depth_is_bounded():
    raw = encode(0x04, b"x")
    for _ in range(MAX_DEPTH + 2):
        raw = encode(0x30, raw)
    with pytest.raises(MalformedTLV):
        validate(raw)
    with pytest.raises(MalformedTLV):
        find(decode(raw), 0x04)


def test_bad_tags_refused_on_encode():
    for tag in (0, 0x1F, 0x9F80, 0xFF01, 0x0102, 0x9F818181_01):
        with pytest.raises(MalformedTLV):
            encode_tag(tag)


_tags = st.one_of(
    st.integers(0x01, 0xFE).filter(lambda b: b & 0x1F != 0x1F),
    st.builds(lambda a, b: (a << 8) | b,
              st.integers(0x1F, 0xFE).map(lambda b: b | 0x1F).filter(lambda b: b != 0xFF),
              st.integers(0x00, 0x7F)),
    st.builds(lambda a, b, c: (a << 16) | (b << 8) | c,
              st.sampled_from([0x5F, 0x7F, 0x9F, 0xBF, 0xDF]),
              st.integers(0x81, 0xFF), st.integers(0x00, 0x7F)),
)


@given(st.lists(st.tuples(_tags, st.binary(max_size=400)), max_size=5))
def test_round_trip(objects):
    raw = b"".join(encode(tag, value) for tag, value in objects)
    parsed = decode(raw)
    assert [(t.tag, t.value) for t in parsed] == objects
    assert b"".join(t.to_bytes() for t in parsed) == raw


@given(st.binary(max_size=64))
def test_arbitrary_bytes_parse_or_raise_typed(raw):
    try:
        validate(raw)
    except MalformedTLV:
        pass
