"""SCP03 key material and the values derived from it (GP Card Spec v2.3 Amendment D v1.2).

Static keys (Key-ENC, Key-MAC, Key-DEK), session keys (S-ENC, S-MAC, S-RMAC), the card and
host authentication cryptograms, the pseudo-random card challenge, security levels and the
INITIALIZE UPDATE response layout. Everything here is pure.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import msgspec

from protocol.errors import SecureChannelError
from protocol.scp03._primitives import AES_KEY_LENGTHS, AesKey, kdf, key_check_value

# Derivation constants, GP Amd D §4.1.5 Table 4-1.
CARD_CRYPTOGRAM = 0x00
HOST_CRYPTOGRAM = 0x01
CARD_CHALLENGE = 0x02
S_ENC = 0x04
S_MAC = 0x06
S_RMAC = 0x07

SCP03 = 0x03
KDD_LENGTH = 10
SEQUENCE_COUNTER_LENGTH = 3
SEQUENCE_COUNTER_MAX = 0xFFFFFF
S8 = 8
S16 = 16

# "i" parameter of SCP03, GP Amd D §5.1 Table 5-1. S16 is b1 in Amd D v1.2 (the Samsung
# OpenSCP vectors use i = '71' for S16, '70' for S8).
I_S16 = 0x01
I_PSEUDO_RANDOM_CHALLENGE = 0x10
I_R_MAC = 0x20
I_R_ENC = 0x40


class SecurityLevel(enum.IntFlag):
    """Security level, P1 of EXTERNAL AUTHENTICATE (GP Amd D §7.1.2 Table 7-2)."""

    NONE = 0x00
    C_MAC = 0x01
    C_DECRYPTION = 0x02
    R_MAC = 0x10
    R_ENCRYPTION = 0x20


# The combinations GP Amd D allows: C-DEC needs C-MAC, R-MAC needs C-MAC, R-ENC needs
# C-DEC and R-MAC.
VALID_SECURITY_LEVELS = frozenset((0x00, 0x01, 0x03, 0x11, 0x13, 0x33))


# Made once: building an IntFlag member from its value costs a few µs in Python.
_SECURITY_LEVELS = {value: SecurityLevel(value) for value in VALID_SECURITY_LEVELS}


def security_level(value: int) -> SecurityLevel:
    """The ``SecurityLevel`` for ``value``, or a typed error for a combination GP forbids."""
    level = _SECURITY_LEVELS.get(value)
    if level is None:
        raise SecureChannelError(f"security level {value:02X} is not one of 00 01 03 11 13 33")
    return level


def check_s_mode(s_mode: int) -> int:
    if s_mode not in (S8, S16):
        raise SecureChannelError(f"S mode must be 8 or 16, not {s_mode}")
    return s_mode


@dataclass(frozen=True, slots=True)
class StaticKeys:
    """One SCP03 key set of a security domain: Key-ENC, Key-MAC, Key-DEK (AES-128/192/256)."""

    enc: bytes = field(repr=False)
    mac: bytes = field(repr=False)
    dek: bytes = field(repr=False)
    _enc: AesKey = field(init=False, repr=False, compare=False)
    _mac: AesKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("enc", "mac", "dek"):
            if len(getattr(self, name)) not in AES_KEY_LENGTHS:
                raise SecureChannelError(f"Key-{name.upper()} must be 16, 24 or 32 bytes")
        object.__setattr__(self, "_enc", AesKey(self.enc))
        object.__setattr__(self, "_mac", AesKey(self.mac))

    @classmethod
    def from_hex(cls, enc: str, mac: str, dek: str) -> StaticKeys:
        return cls(bytes.fromhex(enc), bytes.fromhex(mac), bytes.fromhex(dek))

    @property
    def enc_key(self) -> AesKey:
        return self._enc

    @property
    def mac_key(self) -> AesKey:
        return self._mac

    def check_values(self) -> tuple[bytes, bytes, bytes]:
        """Key check values of ENC, MAC, DEK (safe to log and to compare)."""
        return key_check_value(self.enc), key_check_value(self.mac), key_check_value(self.dek)

    def __repr__(self) -> str:
        return f"StaticKeys(AES-{len(self.enc) * 8}, <redacted>)"


class SessionKeys(msgspec.Struct, frozen=True):
    """S-ENC, S-MAC, S-RMAC of one session (GP Amd D §6.2.1).

    Per-session values are frozen ``msgspec.Struct``s: built in a tenth of a frozen
    dataclass's time, with the same immutability."""

    s_enc: AesKey
    s_mac: AesKey
    s_rmac: AesKey

    def __repr__(self) -> str:
        return "SessionKeys(<redacted>)"

    @classmethod
    def derive(cls, keys: StaticKeys, host_challenge: bytes, card_challenge: bytes) -> SessionKeys:
        context = host_challenge + card_challenge
        bits = len(keys.enc) * 8
        mac_bits = len(keys.mac) * 8
        return cls(
            AesKey(kdf(keys.enc_key, S_ENC, context, bits)),
            AesKey(kdf(keys.mac_key, S_MAC, context, mac_bits)),
            AesKey(kdf(keys.mac_key, S_RMAC, context, mac_bits)),
        )

    def card_cryptogram(self, host_challenge: bytes, card_challenge: bytes) -> bytes:
        """GP Amd D §6.2.2.2: KDF(S-MAC, 00, host challenge ‖ card challenge, 64 or 128 bits)."""
        return kdf(self.s_mac, CARD_CRYPTOGRAM, host_challenge + card_challenge,
                   len(card_challenge) * 8)

    def host_cryptogram(self, host_challenge: bytes, card_challenge: bytes) -> bytes:
        """GP Amd D §6.2.2.3: KDF(S-MAC, 01, host challenge ‖ card challenge, 64 or 128 bits)."""
        return kdf(self.s_mac, HOST_CRYPTOGRAM, host_challenge + card_challenge,
                   len(card_challenge) * 8)


def pseudo_random_card_challenge(
    keys: StaticKeys, sequence_counter: int, sd_aid: bytes, s_mode: int = S8
) -> bytes:
    """GP Amd D §6.2.2.1: KDF(Key-ENC, 02, sequence counter (3 bytes) ‖ SD AID, 64/128 bits)."""
    if not 0 <= sequence_counter <= SEQUENCE_COUNTER_MAX:
        raise SecureChannelError("sequence counter out of range")
    context = sequence_counter.to_bytes(SEQUENCE_COUNTER_LENGTH, "big") + sd_aid
    return kdf(keys.enc_key, CARD_CHALLENGE, context, check_s_mode(s_mode) * 8)


class InitializeUpdateResponse(msgspec.Struct, frozen=True, kw_only=True):
    """Response data of INITIALIZE UPDATE (GP Amd D §7.1.1.6 Table 7-3), without the SW."""

    key_diversification_data: bytes
    key_version: int
    i_parameter: int
    card_challenge: bytes
    card_cryptogram: bytes
    sequence_counter: int | None  # present only with the pseudo-random card challenge

    @property
    def s_mode(self) -> int:
        return len(self.card_challenge)

    @property
    def pseudo_random(self) -> bool:
        return bool(self.i_parameter & I_PSEUDO_RANDOM_CHALLENGE)

    def to_bytes(self) -> bytes:
        out = (
            self.key_diversification_data
            + bytes((self.key_version, SCP03, self.i_parameter))
            + self.card_challenge
            + self.card_cryptogram
        )
        if self.sequence_counter is not None:
            out += self.sequence_counter.to_bytes(SEQUENCE_COUNTER_LENGTH, "big")
        return out

    @classmethod
    def parse(cls, data: bytes, s_mode: int) -> InitializeUpdateResponse:
        check_s_mode(s_mode)
        base = KDD_LENGTH + 3 + 2 * s_mode
        if len(data) not in (base, base + SEQUENCE_COUNTER_LENGTH):
            raise SecureChannelError(
                f"INITIALIZE UPDATE response of {len(data)} bytes does not fit S{s_mode}"
            )
        if data[KDD_LENGTH + 1] != SCP03:
            raise SecureChannelError(f"card answered with SCP {data[KDD_LENGTH + 1]:02X}, not 03")
        i = data[KDD_LENGTH + 2]
        has_counter = len(data) == base + SEQUENCE_COUNTER_LENGTH
        if has_counter != bool(i & I_PSEUDO_RANDOM_CHALLENGE):
            raise SecureChannelError("sequence counter presence disagrees with the i parameter")
        offset = KDD_LENGTH + 3
        return cls(
            key_diversification_data=bytes(data[:KDD_LENGTH]),
            key_version=data[KDD_LENGTH],
            i_parameter=i,
            card_challenge=bytes(data[offset : offset + s_mode]),
            card_cryptogram=bytes(data[offset + s_mode : base]),
            sequence_counter=int.from_bytes(data[base:], "big") if has_counter else None,
        )
