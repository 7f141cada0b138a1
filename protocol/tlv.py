"""BER-TLV (ISO/IEC 7816-4 §5.2, ISO/IEC 8825-1) as used by GlobalPlatform and the JPKI applet.

Tags are ints of their encoded bytes (``0x4F``, ``0x9F70``, ``0xBF0C``); lengths are
decoded in short and long form (``81``–``84``) and encoded in the shortest form. Anything
that does not parse — truncation, an indefinite length, a tag or length running off the
end, nesting deeper than ``MAX_DEPTH`` — raises ``MalformedTLV``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from protocol.errors import MalformedTLV

MAX_DEPTH = 16
_CONSTRUCTED = 0x20
_MULTI_BYTE_TAG = 0x1F
_MORE_TAG_BYTES = 0x80
_MAX_TAG_BYTES = 4
_MAX_LENGTH_BYTES = 4


@dataclass(frozen=True, slots=True)
class Tlv:
    """One data object. For a constructed tag ``value`` holds the encoded children."""

    tag: int
    value: bytes

    @property
    def constructed(self) -> bool:
        return bool(_first_tag_byte(self.tag) & _CONSTRUCTED)

    @property
    def children(self) -> list[Tlv]:
        if not self.constructed:
            raise MalformedTLV(f"tag {self.tag:X} is primitive and has no children")
        return decode(self.value)

    def find(self, tag: int) -> Tlv | None:
        """First descendant with ``tag`` (depth first), or None."""
        return find(self.children, tag) if self.constructed else None

    def find_all(self, tag: int) -> list[Tlv]:
        return find_all(self.children, tag) if self.constructed else []

    def to_bytes(self) -> bytes:
        return encode_tag(self.tag) + encode_length(len(self.value)) + self.value

    def __repr__(self) -> str:
        return f"Tlv({self.tag:X}, {len(self.value)} bytes)"


def _first_tag_byte(tag: int) -> int:
    return tag >> (8 * ((tag.bit_length() - 1) // 8)) if tag else 0


def encode_tag(tag: int) -> bytes:
    if tag <= 0:
        raise MalformedTLV("tag must be positive")
    raw = tag.to_bytes((tag.bit_length() + 7) // 8, "big")
    if raw[0] == 0xFF:
        raise MalformedTLV("'FF' is not a valid first tag byte")
    _check_tag_bytes(raw)
    return raw


def _check_tag_bytes(raw: bytes) -> None:
    if len(raw) > _MAX_TAG_BYTES:
        raise MalformedTLV("tag longer than 4 bytes")
    multi = raw[0] & _MULTI_BYTE_TAG == _MULTI_BYTE_TAG
    if not multi:
        if len(raw) != 1:
            raise MalformedTLV(f"tag {raw.hex().upper()}: first byte does not announce more")
        return
    if len(raw) < 2:
        raise MalformedTLV(f"tag {raw.hex().upper()} is truncated")
    for byte in raw[1:-1]:
        if not byte & _MORE_TAG_BYTES:
            raise MalformedTLV(f"tag {raw.hex().upper()} ends early")
    if raw[-1] & _MORE_TAG_BYTES:
        raise MalformedTLV(f"tag {raw.hex().upper()} does not end")


def encode_length(length: int) -> bytes:
    if length < 0:
        raise MalformedTLV("negative length")
    if length < 0x80:
        return bytes((length,))
    size = (length.bit_length() + 7) // 8
    if size > _MAX_LENGTH_BYTES:
        raise MalformedTLV("length does not fit four bytes")
    return bytes((0x80 | size,)) + length.to_bytes(size, "big")


def encode(tag: int, value: bytes | Iterable[Tlv] = b"") -> bytes:
    """Encode one data object; ``value`` may be raw bytes or child objects."""
    body = value if isinstance(value, bytes | bytearray) else b"".join(c.to_bytes() for c in value)
    return encode_tag(tag) + encode_length(len(body)) + bytes(body)


def build(tag: int, *children: Tlv | bytes) -> Tlv:
    """A constructed object from child objects or already encoded children."""
    body = b"".join(c.to_bytes() if isinstance(c, Tlv) else c for c in children)
    node = Tlv(tag, body)
    if not node.constructed:
        raise MalformedTLV(f"tag {tag:X} is primitive; it cannot hold children")
    return node


def _read_one(data: bytes, offset: int) -> tuple[Tlv, int]:
    end = len(data)
    start = offset
    if offset >= end:
        raise MalformedTLV("expected a tag, found the end")
    first = data[offset]
    if first in (0x00, 0xFF):
        # ISO 7816-4 §5.2.2.1: '00' and 'FF' are not valid first tag bytes.
        raise MalformedTLV(f"invalid tag byte {first:02X}")
    offset += 1
    if first & _MULTI_BYTE_TAG == _MULTI_BYTE_TAG:
        while True:
            if offset >= end:
                raise MalformedTLV("multi-byte tag runs off the end")
            byte = data[offset]
            offset += 1
            if offset - start > _MAX_TAG_BYTES:
                raise MalformedTLV("tag longer than 4 bytes")
            if not byte & _MORE_TAG_BYTES:
                break
    tag = int.from_bytes(data[start:offset], "big")
    if offset >= end:
        raise MalformedTLV(f"tag {tag:X} has no length")
    length = data[offset]
    offset += 1
    if length & 0x80:
        size = length & 0x7F
        if size == 0:
            raise MalformedTLV("indefinite length is not allowed")
        if size > _MAX_LENGTH_BYTES:
            raise MalformedTLV(f"length field of {size} bytes")
        if offset + size > end:
            raise MalformedTLV("length field runs off the end")
        length = int.from_bytes(data[offset : offset + size], "big")
        offset += size
    if offset + length > end:
        raise MalformedTLV(f"tag {tag:X} announces {length} bytes, {end - offset} remain")
    return Tlv(tag, bytes(data[offset : offset + length])), offset + length


def iter_tlv(data: bytes) -> Iterator[Tlv]:
    """The top-level data objects of ``data``, in order."""
    offset = 0
    while offset < len(data):
        node, offset = _read_one(data, offset)
        yield node


def decode(data: bytes) -> list[Tlv]:
    return list(iter_tlv(data))


def decode_one(data: bytes) -> Tlv:
    """Exactly one data object filling ``data``."""
    node, offset = _read_one(data, 0)
    if offset != len(data):
        raise MalformedTLV(f"{len(data) - offset} bytes after the data object")
    return node


def validate(data: bytes, depth: int = 0) -> None:
    """Parse ``data`` and every constructed object in it, to the bottom."""
    if depth > MAX_DEPTH:
        raise MalformedTLV(f"nesting deeper than {MAX_DEPTH}")
    for node in iter_tlv(data):
        if node.constructed:
            validate(node.value, depth + 1)


def find(nodes: Iterable[Tlv], tag: int, _depth: int = 0) -> Tlv | None:
    """First object with ``tag`` among ``nodes`` and their descendants (depth first)."""
    if _depth > MAX_DEPTH:
        raise MalformedTLV(f"nesting deeper than {MAX_DEPTH}")
    for node in nodes:
        if node.tag == tag:
            return node
        if node.constructed:
            hit = find(decode(node.value), tag, _depth + 1)
            if hit is not None:
                return hit
    return None


def find_all(nodes: Iterable[Tlv], tag: int, _depth: int = 0) -> list[Tlv]:
    """Every object with ``tag`` among ``nodes`` and their descendants, in document order."""
    if _depth > MAX_DEPTH:
        raise MalformedTLV(f"nesting deeper than {MAX_DEPTH}")
    hits: list[Tlv] = []
    for node in nodes:
        if node.tag == tag:
            hits.append(node)
        if node.constructed:
            hits.extend(find_all(decode(node.value), tag, _depth + 1))
    return hits
