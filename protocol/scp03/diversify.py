"""Per-SE SCP03 static keys from the TSM's master keys ("KDF3", as GlobalPlatformPro names it).

For each key of the set, with the SE's 10-byte key diversification data (KDD, returned in
every INITIALIZE UPDATE response and reported by the app at eligibility):

    key = CMAC(master, i ‖ 00 00 00 c 00 ‖ KDD) for i = 1, 2, …, cut to the master's length

with c = 01 for Key-ENC, 02 for Key-MAC, 03 for Key-DEK. It is NIST SP 800-108 counter
mode with AES-CMAC, the counter placed before the fixed input (GlobalPlatformPro's
``scp03_kdf(master, {}, constant ‖ KDD, len)``). Pinned to GlobalPlatformPro's
``TestSCP03.testKDF3`` vector and to its diversified default-key check values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.errors import SecureChannelError
from protocol.scp03._primitives import AES_KEY_LENGTHS, AesKey
from protocol.scp03.keys import KDD_LENGTH, StaticKeys

ENC_CONSTANT = bytes.fromhex("0000000100")
MAC_CONSTANT = bytes.fromhex("0000000200")
DEK_CONSTANT = bytes.fromhex("0000000300")


@dataclass(frozen=True, slots=True)
class MasterKeys:
    """The TSM's master keys for one key set (they may all be the same key)."""

    enc: bytes = field(repr=False)
    mac: bytes = field(repr=False)
    dek: bytes = field(repr=False)
    # Long-lived in the TSM: keep the keyed CMAC contexts instead of rebuilding them per SE.
    _ciphers: tuple[AesKey, AesKey, AesKey] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("enc", "mac", "dek"):
            if len(getattr(self, name)) not in AES_KEY_LENGTHS:
                raise SecureChannelError(f"master {name.upper()} key must be 16, 24 or 32 bytes")
        object.__setattr__(self, "_ciphers", (AesKey(self.enc), AesKey(self.mac), AesKey(self.dek)))

    def __repr__(self) -> str:
        return f"MasterKeys(AES-{len(self.enc) * 8}, <redacted>)"


def kdf3(master: bytes | AesKey, fixed_input: bytes) -> bytes:
    """CMAC(master, i ‖ fixed_input) for i = 1, 2, …, truncated to the master key's length."""
    key = master if isinstance(master, AesKey) else AesKey(master)
    blocks = -(-key.length // 16)
    out = b"".join(key.cmac(bytes((i,)) + fixed_input) for i in range(1, blocks + 1))
    return out[: key.length]


def diversify_kdf3(master: MasterKeys, kdd: bytes) -> StaticKeys:
    """The SE's static keys for key diversification data ``kdd`` (10 bytes)."""
    if len(kdd) != KDD_LENGTH:
        raise SecureChannelError("key diversification data must be 10 bytes")
    enc, mac, dek = master._ciphers
    return StaticKeys(
        kdf3(enc, ENC_CONSTANT + kdd), kdf3(mac, MAC_CONSTANT + kdd), kdf3(dek, DEK_CONSTANT + kdd)
    )
