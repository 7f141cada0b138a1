"""PUT KEY key data for AES keys under SCP03: host-side builder, card-side parser.

GPC v2.3 §11.8.2.3 (PUT KEY data field): new KVN (1 byte), then per key: key type
('88' = AES), length of the key component block, the key component block, length of the
KCV, the KCV (3 bytes: AES-ECB(key, 16 × '01')). Under SCP03 the key component is
encrypted with the static Key-DEK, AES-CBC with a zero ICV (GP Amd D §7.x).

The key component block comes in three shapes, all accepted by the parser:

* ``PLAIN`` (GPC Table 11-71): AES-CBC(DEK, key) — only for 16- and 32-byte keys.
* ``LENGTH_PREFIXED`` (GPC Table 11-70; what GlobalPlatformPro and pySim send): the key
  length in clear, then AES-CBC(DEK, key ‖ '00' padding to a block).
* ``ENCRYPTED_LENGTH``: AES-CBC(DEK, key length ‖ key ‖ '00' padding) — the length byte
  inside the encrypted block.

A block of 16·n + 1 bytes is ``LENGTH_PREFIXED``. A block of 16·n bytes is ``PLAIN`` or
``ENCRYPTED_LENGTH``; the KCV decides, so a KCV is required when both readings are
possible.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from hmac import compare_digest

from protocol.apdu import CommandAPDU
from protocol.errors import SecureChannelError
from protocol.scp03._primitives import AES_KEY_LENGTHS, BLOCK, AesKey, key_check_value

AES_KEY_TYPE = 0x88
KCV_LENGTH = 3
INS_PUT_KEY = 0xD8
_ZERO_ICV = bytes(BLOCK)
_MULTIPLE_KEYS = 0x80  # PUT KEY P2 b8: more than one key in the data field


class KeyBlockError(SecureChannelError):
    """PUT KEY key data that does not decode or whose KCV does not match."""


class KeyBlockStyle(enum.Enum):
    PLAIN = "plain"
    LENGTH_PREFIXED = "length-prefixed"
    ENCRYPTED_LENGTH = "encrypted-length"


@dataclass(frozen=True, slots=True)
class KeyComponent:
    """One decoded AES key of a PUT KEY command."""

    key: bytes = field(repr=False)
    style: KeyBlockStyle
    check_value: bytes  # empty when the host sent none

    def __repr__(self) -> str:
        return f"KeyComponent(AES-{len(self.key) * 8}, {self.style.value}, <redacted>)"


def _pad_zero(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def encode_key_block(dek: bytes, key: bytes, style: KeyBlockStyle) -> bytes:
    if len(key) not in AES_KEY_LENGTHS:
        raise KeyBlockError("AES keys are 16, 24 or 32 bytes")
    cipher = AesKey(dek)
    if style is KeyBlockStyle.PLAIN:
        if len(key) % BLOCK:
            raise KeyBlockError("the plain key block needs a key of whole blocks")
        return cipher.cbc_encrypt(_ZERO_ICV, key)
    if style is KeyBlockStyle.LENGTH_PREFIXED:
        return bytes((len(key),)) + cipher.cbc_encrypt(_ZERO_ICV, _pad_zero(key))
    return cipher.cbc_encrypt(_ZERO_ICV, _pad_zero(bytes((len(key),)) + key))


def put_key_data(dek: bytes, new_key_version: int, keys: Sequence[bytes],
                 style: KeyBlockStyle = KeyBlockStyle.LENGTH_PREFIXED) -> bytes:
    """The PUT KEY data field: new KVN, then each key encrypted under ``dek`` with its KCV."""
    if not 1 <= new_key_version <= 0x7F:
        raise KeyBlockError("key version must be 01..7F")
    out = bytearray((new_key_version,))
    for key in keys:
        block = encode_key_block(dek, key, style)
        if len(block) > 0x7F:
            raise KeyBlockError("key component block too long")
        out += bytes((AES_KEY_TYPE, len(block))) + block
        out += bytes((KCV_LENGTH,)) + key_check_value(key)
    return bytes(out)


def put_key_command(dek: bytes, *, old_key_version: int, new_key_version: int,
                    keys: Sequence[bytes], first_key_id: int = 1,
                    style: KeyBlockStyle = KeyBlockStyle.LENGTH_PREFIXED) -> CommandAPDU:
    """PUT KEY (GPC §11.8): P1 = KVN replaced (00 adds a new set), P2 = first key id,
    b8 set when several keys follow. Wrap it in the secure channel before sending."""
    if not 1 <= first_key_id <= 0x7F:
        raise KeyBlockError("key identifier must be 01..7F")
    p2 = first_key_id | (_MULTIPLE_KEYS if len(keys) > 1 else 0)
    data = put_key_data(dek, new_key_version, keys, style)
    return CommandAPDU(0x80, INS_PUT_KEY, old_key_version, p2, data, le=256)


def _readings(cipher: AesKey, block: bytes) -> list[tuple[bytes, KeyBlockStyle]]:
    """Every way ``block`` can decode, before the KCV picks one."""
    n = len(block)
    if n % BLOCK == 1:
        length, encrypted = block[0], block[1:]
        if length not in AES_KEY_LENGTHS or length > len(encrypted):
            raise KeyBlockError("bad key length in a length-prefixed key block")
        clear = cipher.cbc_decrypt(_ZERO_ICV, encrypted)
        return [(clear[:length], KeyBlockStyle.LENGTH_PREFIXED)]
    if n == 0 or n % BLOCK:
        raise KeyBlockError(f"a key component block cannot be {n} bytes long")
    clear = cipher.cbc_decrypt(_ZERO_ICV, block)
    readings = []
    if n in AES_KEY_LENGTHS:
        readings.append((clear, KeyBlockStyle.PLAIN))
    length = clear[0]
    if length in AES_KEY_LENGTHS and 1 + length <= n and not any(clear[1 + length :]):
        readings.append((clear[1 : 1 + length], KeyBlockStyle.ENCRYPTED_LENGTH))
    if not readings:
        raise KeyBlockError("key component block does not decode")
    return readings


def parse_put_key_data(dek: bytes, data: bytes) -> tuple[int, list[KeyComponent]]:
    """Card side: the new KVN and the decrypted keys, each KCV checked (constant time)."""
    if len(data) < 1:
        raise KeyBlockError("empty PUT KEY data")
    new_key_version = data[0]
    cipher = AesKey(dek)
    components: list[KeyComponent] = []
    offset = 1
    while offset < len(data):
        if offset + 2 > len(data):
            raise KeyBlockError("truncated key type or length")
        key_type, block_length = data[offset], data[offset + 1]
        if key_type != AES_KEY_TYPE:
            raise KeyBlockError(f"key type {key_type:02X} is not AES ('88')")
        block = data[offset + 2 : offset + 2 + block_length]
        offset += 2 + block_length
        if len(block) != block_length or offset >= len(data):
            raise KeyBlockError("truncated key component")
        kcv_length = data[offset]
        kcv = data[offset + 1 : offset + 1 + kcv_length]
        offset += 1 + kcv_length
        if len(kcv) != kcv_length or kcv_length not in (0, KCV_LENGTH):
            raise KeyBlockError("bad key check value field")
        readings = _readings(cipher, block)
        if kcv:
            matching = [r for r in readings if compare_digest(key_check_value(r[0]), kcv)]
            if not matching:
                raise KeyBlockError("key check value does not match")
            key, style = matching[0]
        elif len(readings) == 1:
            key, style = readings[0]
        else:
            raise KeyBlockError("ambiguous key block without a key check value")
        components.append(KeyComponent(key, style, bytes(kcv)))
    if not components:
        raise KeyBlockError("PUT KEY data holds no key")
    return new_key_version, components
