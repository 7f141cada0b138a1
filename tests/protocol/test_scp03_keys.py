"""Key material: primitives against pyca directly, KDF3 diversification, PUT KEY key blocks."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import SecureChannelError
from protocol.scp03 import (
    KeyBlockStyle,
    MasterKeys,
    diversify_kdf3,
    key_check_value,
    parse_put_key_data,
    put_key_data,
)
from protocol.scp03._primitives import AesKey, pad_m2, unpad_m2
from protocol.scp03.keyblock import KeyBlockError, encode_key_block, put_key_command

DEK = bytes.fromhex("202122232425262728292A2B2C2D2E2F")


def _cbc(key: bytes, iv: bytes, data: bytes, encrypt: bool) -> bytes:
    cipher = Cipher(algorithms.AES(key), modes.CBC(iv))
    op = cipher.encryptor() if encrypt else cipher.decryptor()
    return op.update(data) + op.finalize()


@pytest.mark.parametrize("blocks", [1, 2, 4, 5, 9, 40])
@pytest.mark.parametrize("key_size", [16, 24, 32])
def test_cbc_matches_openssl_on_both_paths(blocks, key_size):
    key, iv, data = os.urandom(key_size), os.urandom(16), os.urandom(16 * blocks)
    aes = AesKey(key)
    assert aes.cbc_encrypt(iv, data) == _cbc(key, iv, data, True)
    assert aes.cbc_decrypt(iv, data) == _cbc(key, iv, data, False)


def test_cbc_with_many_ivs_through_one_key_matches_openssl():
    # One AesKey keeps one CBC context per direction across messages: every message, in
    # any order and with any IV (zero included), must still be plain CBC under its own IV.
    key = os.urandom(16)
    aes = AesKey(key)
    for blocks in (1, 3, 1, 64, 2, 1, 5):
        for iv in (os.urandom(16), bytes(16)):
            data = os.urandom(16 * blocks)
            assert aes.cbc_encrypt(iv, data) == _cbc(key, iv, data, True)
            assert aes.cbc_decrypt(iv, data) == _cbc(key, iv, data, False)
            assert aes.ecb_encrypt(data[:16]) == _cbc(key, bytes(16), data[:16], True)
            icv = _cbc(key, bytes(16), iv, True)
            assert aes.cbc_encrypt_with_encrypted_iv(iv, data) == _cbc(key, icv, data, True)


def test_cbc_refuses_partial_blocks():
    with pytest.raises(SecureChannelError):
        AesKey(DEK).cbc_encrypt(bytes(16), b"\x00" * 15)
    with pytest.raises(SecureChannelError):
        AesKey(DEK).cbc_decrypt(bytes(16), b"")
    with pytest.raises(SecureChannelError):
        AesKey(b"short")


@given(st.binary(max_size=100))
def test_m2_padding_round_trip(data):
    padded = pad_m2(data)
    assert len(padded) % 16 == 0 and 1 <= len(padded) - len(data) <= 16
    assert unpad_m2(padded) == data


@pytest.mark.parametrize("padded", [bytes(16), b"\x01" * 16, b"\x00" * 15 + b"\x81"])
def test_m2_padding_errors(padded):
    with pytest.raises(SecureChannelError):
        unpad_m2(padded)


def test_kdf3_diversification_matches_globalplatformpro_check_values():
    """GlobalPlatformPro TestPlaintextKeys.testDefaultKeysWithDiversifier: the default key
    404142…4F diversified with KDF3 for KDD 00 01 … 09 has KCVs E79C05, D1BD77, 3FDE8C.
    Pins the MAC and DEK constants, which the KDF3 vector (ENC only) does not."""
    default = bytes.fromhex("404142434445464748494A4B4C4D4E4F")
    keys = diversify_kdf3(MasterKeys(default, default, default), bytes(range(10)))
    assert [kcv.hex().upper() for kcv in keys.check_values()] == ["E79C05", "D1BD77", "3FDE8C"]


def test_diversification_separates_ses_and_key_types():
    master = MasterKeys(os.urandom(32), os.urandom(32), os.urandom(32))
    a = diversify_kdf3(master, bytes(10))
    b = diversify_kdf3(master, bytes(9) + b"\x01")
    assert len({a.enc, a.mac, a.dek, b.enc, b.mac, b.dek}) == 6
    assert len(a.enc) == 32
    with pytest.raises(SecureChannelError):
        diversify_kdf3(master, bytes(9))


def test_length_prefixed_block_is_what_globalplatformpro_sends():
    """GPC Table 11-70 as GlobalPlatformPro encodes an AES key: '10' ‖ AES-CBC(DEK, key)."""
    key = bytes.fromhex("000102030405060708090A0B0C0D0E0F")
    block = encode_key_block(DEK, key, KeyBlockStyle.LENGTH_PREFIXED)
    assert block == b"\x10" + _cbc(DEK, bytes(16), key, True)
    data = put_key_data(DEK, 0x31, [key])
    assert data == b"\x31\x88\x11" + block + b"\x03" + bytes.fromhex("C35280")


@pytest.mark.parametrize("style", list(KeyBlockStyle))
@pytest.mark.parametrize("size", [16, 24, 32])
def test_key_blocks_round_trip(style, size):
    if style is KeyBlockStyle.PLAIN and size == 24:
        with pytest.raises(KeyBlockError):
            encode_key_block(DEK, bytes(size), style)
        return
    keys = [os.urandom(size) for _ in range(3)]
    version, components = parse_put_key_data(DEK, put_key_data(DEK, 0x32, keys, style))
    assert version == 0x32
    assert [c.key for c in components] == keys
    assert all(c.style is style for c in components)
    assert [c.check_value for c in components] == [key_check_value(k) for k in keys]


def test_put_key_command_shape():
    keys = [os.urandom(16) for _ in range(3)]
    command = put_key_command(DEK, old_key_version=0x30, new_key_version=0x31, keys=keys)
    assert (command.cla, command.ins, command.p1, command.p2) == (0x80, 0xD8, 0x30, 0x81)
    assert parse_put_key_data(DEK, command.data)[0] == 0x31


def test_kcv_mismatch_is_refused():
    data = bytearray(put_key_data(DEK, 0x31, [os.urandom(16)]))
    data[-1] ^= 0x01
    with pytest.raises(KeyBlockError, match="check value"):
        parse_put_key_data(DEK, bytes(data))


def test_wrong_dek_is_refused():
    data = put_key_data(DEK, 0x31, [os.urandom(32)], KeyBlockStyle.PLAIN)
    with pytest.raises(KeyBlockError):
        parse_put_key_data(bytes(16), data)


def test_ambiguous_block_without_kcv_is_refused():
    """A 32-byte block can be a plain AES-256 key or an encrypted-length AES-128 key;
    without a KCV the parser will not guess."""
    key = os.urandom(16)
    block = encode_key_block(DEK, key, KeyBlockStyle.ENCRYPTED_LENGTH)
    data = b"\x31\x88" + bytes((len(block),)) + block + b"\x00"
    with pytest.raises(KeyBlockError, match="ambiguous"):
        parse_put_key_data(DEK, data)
    # An unambiguous block needs no KCV.
    block = encode_key_block(DEK, key, KeyBlockStyle.LENGTH_PREFIXED)
    data = b"\x31\x88" + bytes((len(block),)) + block + b"\x00"
    assert parse_put_key_data(DEK, data)[1][0].key == key


@pytest.mark.parametrize(
    "data",
    ["", "31", "3188", "318811", "3180" + "00" * 20, "31881100", "318810" + "00" * 16 + "05",
     "318811" + "AA" + "00" * 16 + "03AABBCC"],
)
def test_malformed_put_key_data(data):
    with pytest.raises(KeyBlockError):
        parse_put_key_data(DEK, bytes.fromhex(data))


def test_key_component_repr_is_redacted():
    key = bytes(range(16))
    _, components = parse_put_key_data(DEK, put_key_data(DEK, 0x31, [key]))
    assert key.hex() not in repr(components[0]).lower()
