"""The SP-TSM's master keys: an encrypted key file, and the per-SE keys derived from it.

Key file (JSON): the master keys (ENC, MAC, DEK master keys and the key version they
produce) sealed with AES-256-GCM under a key derived from a passphrase with scrypt
(RFC 7914). The file header (format, KDF parameters, salt, nonce) is authenticated as
GCM associated data, so a tampered header fails like a tampered ciphertext.

Master keys never appear in a repr, a log line, a message or an exception text.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from device_sim.se.card_manager import KeySet
from protocol.errors import JpkiError
from protocol.scp03.diversify import MasterKeys as Scp03MasterKeys
from protocol.scp03.diversify import diversify_kdf3
from protocol.scp03.keys import StaticKeys

KEY_FILE_FORMAT = "jpki-tsm-master-keys/1"
# scrypt cost (RFC 7914 §2): N = 2^15, r = 8, p = 1 — about 32 MiB and ~0.1 s per unlock.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1


class KeyFileError(JpkiError):
    """The key file is missing, malformed, tampered with, or the passphrase is wrong."""


@dataclass(frozen=True, slots=True)
class MasterKeys:
    """The TSM's SCP03 master keys for one key version (AES-128/192/256)."""

    kvn: int
    enc: bytes = field(repr=False)
    mac: bytes = field(repr=False)
    dek: bytes = field(repr=False)
    # The master keys loaded into their cipher contexts once, not again for every new SE.
    _diversifier: Scp03MasterKeys = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0x01 <= self.kvn <= 0x7F:
            raise KeyFileError("key version must be 01-7F")
        for key in (self.enc, self.mac, self.dek):
            if len(key) not in (16, 24, 32):
                raise KeyFileError("master keys must be AES-128, -192 or -256")
        object.__setattr__(self, "_diversifier", Scp03MasterKeys(self.enc, self.mac, self.dek))

    @classmethod
    def generate(
        cls, kvn: int, length: int = 16, random_bytes: Callable[[int], bytes] = os.urandom
    ) -> MasterKeys:
        return cls(kvn, random_bytes(length), random_bytes(length), random_bytes(length))

    def static_keys_for(self, kdd: bytes) -> StaticKeys:
        """The static SCP03 keys of the SE whose key diversification data is ``kdd``
        (GlobalPlatformPro's KDF3, ``protocol.scp03.diversify``)."""
        return diversify_kdf3(self._diversifier, kdd)

    def for_se(self, kdd: bytes) -> KeySet:
        """The same keys as the SE's security domain stores them (with the key version)."""
        keys = self.static_keys_for(kdd)
        return KeySet(self.kvn, keys.enc, keys.mac, keys.dek)


@dataclass(frozen=True, slots=True)
class MasterKeyRing:
    """Every master key version the TSM holds; ``current`` is what new SEs and rotations get."""

    versions: dict[int, MasterKeys] = field(repr=False)
    current: int

    def __post_init__(self) -> None:
        if self.current not in self.versions:
            raise KeyFileError("the current key version is not in the key ring")

    def __repr__(self) -> str:
        return f"MasterKeyRing(versions={sorted(self.versions)}, current={self.current})"

    def get(self, kvn: int) -> MasterKeys:
        try:
            return self.versions[kvn]
        except KeyError:
            raise KeyFileError(f"no master keys for key version {kvn:02X}") from None

    @property
    def current_keys(self) -> MasterKeys:
        return self.versions[self.current]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _derive(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)


def seal_key_ring(
    ring: MasterKeyRing,
    passphrase: bytes,
    *,
    random_bytes: Callable[[int], bytes] = os.urandom,
    scrypt_n: int = SCRYPT_N,
) -> bytes:
    """The key file's bytes for ``ring`` under ``passphrase``."""
    if not passphrase:
        raise KeyFileError("an empty passphrase protects nothing")
    salt, nonce = random_bytes(16), random_bytes(12)
    header = {
        "format": KEY_FILE_FORMAT,
        "kdf": {"name": "scrypt", "n": scrypt_n, "r": SCRYPT_R, "p": SCRYPT_P, "salt": _b64(salt)},
        "cipher": {"name": "AES-256-GCM", "nonce": _b64(nonce)},
    }
    plaintext = json.dumps(
        {
            "current": ring.current,
            "versions": [
                {"kvn": k.kvn, "enc": k.enc.hex(), "mac": k.mac.hex(), "dek": k.dek.hex()}
                for k in ring.versions.values()
            ],
        }
    ).encode()
    aad = json.dumps(header, sort_keys=True).encode()
    key = _derive(passphrase, salt, scrypt_n, SCRYPT_R, SCRYPT_P)
    sealed = AESGCM(key).encrypt(nonce, plaintext, aad)
    return json.dumps({**header, "ciphertext": _b64(sealed)}, indent=1).encode()


def open_key_ring(data: bytes, passphrase: bytes) -> MasterKeyRing:
    """Decrypt a key file; any defect is a ``KeyFileError`` that names no key material."""
    try:
        document = json.loads(data)
        header = {k: document[k] for k in ("format", "kdf", "cipher")}
        if header["format"] != KEY_FILE_FORMAT or header["kdf"]["name"] != "scrypt":
            raise KeyFileError("not a TSM master key file")
        kdf = header["kdf"]
        key = _derive(passphrase, _unb64(kdf["salt"]), int(kdf["n"]), int(kdf["r"]), int(kdf["p"]))
        aad = json.dumps(header, sort_keys=True).encode()
        plaintext = AESGCM(key).decrypt(
            _unb64(header["cipher"]["nonce"]), _unb64(document["ciphertext"]), aad
        )
    except InvalidTag:
        raise KeyFileError("wrong passphrase or tampered key file") from None
    except KeyFileError:
        raise
    except (ValueError, KeyError, TypeError):
        raise KeyFileError("malformed key file") from None
    try:
        content = json.loads(plaintext)
        versions = {
            int(v["kvn"]): MasterKeys(
                int(v["kvn"]),
                bytes.fromhex(v["enc"]),
                bytes.fromhex(v["mac"]),
                bytes.fromhex(v["dek"]),
            )
            for v in content["versions"]
        }
        return MasterKeyRing(versions, int(content["current"]))
    except (ValueError, KeyError, TypeError):
        raise KeyFileError("malformed key file content") from None


def load_key_file(path: Path, passphrase: bytes) -> MasterKeyRing:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file: {exc.strerror}") from None
    return open_key_ring(data, passphrase)


def write_key_file(path: Path, ring: MasterKeyRing, passphrase: bytes, **kwargs: object) -> None:
    data = seal_key_ring(ring, passphrase, **kwargs)  # type: ignore[arg-type]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
