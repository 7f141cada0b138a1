"""CA private keys in encrypted key files (PKCS#8, PEM, encrypted with a passphrase).

The passphrase comes from ``JPKI_CA_PASSPHRASE`` or from the file named by
``JPKI_CA_PASSPHRASE_FILE`` (a mounted secret). It lives in a ``Passphrase`` whose repr is
redacted, and is never logged or put in a message or an exception.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from workers.ca.errors import CaKeyUnavailable

PASSPHRASE_ENV = "JPKI_CA_PASSPHRASE"  # noqa: S105 - the variable's name, not its value
PASSPHRASE_FILE_ENV = "JPKI_CA_PASSPHRASE_FILE"  # noqa: S105 - a variable name


@dataclass(frozen=True)
class Passphrase:
    value: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.value) < 8:
            raise CaKeyUnavailable("the CA key passphrase must be at least 8 bytes")

    def __repr__(self) -> str:
        return "Passphrase(<redacted>)"

    @classmethod
    def from_environment(cls) -> Passphrase:
        path = os.environ.get(PASSPHRASE_FILE_ENV)
        if path:
            try:
                return cls(Path(path).read_bytes().strip())
            except OSError:
                raise CaKeyUnavailable(
                    f"cannot read the file named by {PASSPHRASE_FILE_ENV}"
                ) from None
        value = os.environ.get(PASSPHRASE_ENV)
        if not value:
            raise CaKeyUnavailable(f"set {PASSPHRASE_ENV} or {PASSPHRASE_FILE_ENV}")
        return cls(value.encode())


def write_key(path: Path, key: rsa.RSAPrivateKey, passphrase: Passphrase) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase.value),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    # create with owner-only permissions from the start: the file never exists world-readable
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def read_key(path: Path, passphrase: Passphrase) -> rsa.RSAPrivateKey:
    try:
        pem = path.read_bytes()
    except OSError:
        raise CaKeyUnavailable(f"CA key file {path.name} is missing") from None
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase.value)
    except (ValueError, TypeError):
        # wrong passphrase or damaged file: the message must not echo either
        raise CaKeyUnavailable(f"CA key file {path.name} cannot be decrypted") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CaKeyUnavailable(f"CA key file {path.name} does not hold an RSA key")
    return key
