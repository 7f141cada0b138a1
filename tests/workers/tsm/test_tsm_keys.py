"""The TSM's encrypted master-key file and per-SE key diversification."""

from __future__ import annotations

import json

import pytest

from workers.tsm.keys import (
    KeyFileError,
    MasterKeyRing,
    MasterKeys,
    load_key_file,
    open_key_ring,
    seal_key_ring,
    write_key_file,
)

FAST = {"scrypt_n": 2**10}  # tests only: the file records its own cost parameter


def _ring() -> MasterKeyRing:
    return MasterKeyRing(
        {
            0x30: MasterKeys(0x30, bytes(range(16)), bytes(range(16, 32)), bytes(range(32, 48))),
            0x31: MasterKeys.generate(0x31, 32),
        },
        0x31,
    )


def test_key_file_round_trip(tmp_path) -> None:
    ring = _ring()
    path = tmp_path / "tsm-keys.json"
    write_key_file(path, ring, b"correct horse", **FAST)
    assert path.stat().st_mode & 0o777 == 0o600
    opened = load_key_file(path, b"correct horse")
    assert opened.current == 0x31
    assert opened.get(0x30) == ring.get(0x30) and opened.get(0x31) == ring.get(0x31)
    text = path.read_text()
    for keys in ring.versions.values():
        for key in (keys.enc, keys.mac, keys.dek):
            assert key.hex() not in text.lower()


def test_wrong_passphrase_and_tampering_are_refused() -> None:
    sealed = seal_key_ring(_ring(), b"secret", **FAST)
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        open_key_ring(sealed, b"Secret")
    document = json.loads(sealed)
    document["kdf"]["n"] = 2**11  # a changed header is authenticated data
    with pytest.raises(KeyFileError):
        open_key_ring(json.dumps(document).encode(), b"secret")
    document = json.loads(sealed)
    document["ciphertext"] = document["ciphertext"][:-8] + "AAAAAAA="
    with pytest.raises(KeyFileError):
        open_key_ring(json.dumps(document).encode(), b"secret")
    with pytest.raises(KeyFileError, match="malformed"):
        open_key_ring(b"not json", b"secret")
    with pytest.raises(KeyFileError):
        seal_key_ring(_ring(), b"")


def test_missing_key_file_and_version(tmp_path) -> None:
    with pytest.raises(KeyFileError, match="cannot read"):
        load_key_file(tmp_path / "absent.json", b"x")
    with pytest.raises(KeyFileError, match="key version 7F"):
        _ring().get(0x7F)
    with pytest.raises(KeyFileError):
        MasterKeys(0x80, bytes(16), bytes(16), bytes(16))
    with pytest.raises(KeyFileError):
        MasterKeys(0x30, bytes(15), bytes(16), bytes(16))


def test_no_key_material_in_repr() -> None:
    ring = _ring()
    keys = ring.get(0x30)
    for text in (repr(ring), repr(keys), repr(keys.for_se(bytes(10))), str(ring)):
        assert keys.enc.hex() not in text and keys.mac.hex() not in text


def test_diversification_follows_the_globalplatformpro_kdf3_vector() -> None:
    # martinpaljak/GlobalPlatformPro TestSCP03.testKDF3 (shared SCP03 vectors): the ENC key
    # of KDD D9B1DE5D0362DEDCE4FB under this master is 9AAC5D0B...4781.
    master = bytes.fromhex("8C72C72CF908411653018807950D82FBAD947562F0828A0B10B8B9606ABF3BCD")
    keys = MasterKeys(0x30, master, master, master).for_se(bytes.fromhex("D9B1DE5D0362DEDCE4FB"))
    assert keys.enc == bytes.fromhex(
        "9AAC5D0B3601F89438A0D9D0B6B256CFB47E6462DFA5228D3420C4AC7C224781"
    )
    assert keys.kvn == 0x30
    assert len({keys.enc, keys.mac, keys.dek}) == 3  # one derivation per key role


def test_each_se_gets_its_own_keys() -> None:
    master = _ring().get(0x30)
    first, second = master.for_se(bytes(10)), master.for_se(bytes(9) + b"\x01")
    assert first.enc != second.enc and first.mac != second.mac and first.dek != second.dek
