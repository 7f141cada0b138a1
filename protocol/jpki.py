"""The JPKI application's public facts and the host side of its APDU interface.

Pure code: constants (AID, EF ids, tokens, PIN rules), DigestInfo helpers, the APDU
builders a host uses (the phone's app, a relying party, OpenSC does the same), response
parsing, and the builders and parsers of the personalisation commands the SP-TSM sends
(our own design, documented in ``docs/personalisation.md``). The applet that answers all
of this is ``device_sim.se.jpki_applet``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from protocol.apdu import CommandAPDU, ResponseAPDU
from protocol.errors import CardError, JpkiError, StatusWord


class PinOption(enum.IntEnum):
    """The seed's PIN-setting options (seed README, reference table): how the applet's PINs
    get from the SP-TSM's temporary values to the user's own. 3 and 4 are for production."""

    USER_TYPES_TEMPORARY = 1
    APP_TYPES_TEMPORARY = 2
    BLOCKED_UNTIL_RELEASED = 3
    INITIAL_STATE = 4
    REAL_PIN_AT_APPLICATION = 5
    PUK = 6


# DOMAIN.md §1 (the same values OpenSC's jpki driver uses).
AID = bytes.fromhex("D392F000260100000001")
CARD_ATR = bytes.fromhex("3BE000FF8131FE4514")


class EF(enum.IntEnum):
    SIGN_CERT = 0x0001
    SIGN_CA_CERT = 0x0002
    TOKEN = 0x0006
    AUTH_CERT = 0x000A
    AUTH_CA_CERT = 0x000B
    AUTH_KEY = 0x0017
    AUTH_PIN = 0x0018
    SIGN_KEY = 0x001A
    SIGN_PIN = 0x001B


CERTIFICATE_EFS = (EF.SIGN_CERT, EF.SIGN_CA_CERT, EF.AUTH_CERT, EF.AUTH_CA_CERT)
KEY_EFS = (EF.AUTH_KEY, EF.SIGN_KEY)
PIN_EFS = (EF.AUTH_PIN, EF.SIGN_PIN)

TOKEN_LENGTH = 32
CARD_TOKEN = "JPKIAPICCTOKEN2"  # noqa: S105 -- EF 0006 token, not a secret
PHONE_TOKEN = "JPKIAPGPSETOKEN"  # noqa: S105 -- EF 0006 token, not a secret


def token_bytes(token: str) -> bytes:
    """EF 0006 content: the token as ASCII, space padded to 32 bytes."""
    raw = token.encode("ascii")
    if len(raw) > TOKEN_LENGTH:
        raise ValueError("token longer than 32 bytes")
    return raw.ljust(TOKEN_LENGTH, b" ")


def parse_token(data: bytes) -> str:
    return data.decode("ascii", errors="replace").rstrip(" ")


class InvalidPin(JpkiError):
    """A PIN or password that breaks the format rules (the message never contains it)."""


@dataclass(frozen=True, slots=True)
class PinRule:
    name: str
    min_length: int
    max_length: int
    alphabet: str  # regex character class
    max_tries: int

    def check(self, pin: str) -> bytes:
        """Return the PIN as the raw ASCII sent in VERIFY, or raise ``InvalidPin``."""
        if not self.min_length <= len(pin) <= self.max_length or not re.fullmatch(
            f"[{self.alphabet}]+", pin
        ):
            length = (
                str(self.min_length) if self.min_length == self.max_length
                else f"{self.min_length}-{self.max_length}"
            )
            raise InvalidPin(f"{self.name} must be {length} characters of [{self.alphabet}]")
        return pin.encode("ascii")

    def accepts(self, pin: str | bytes) -> bool:
        try:
            self.check(pin.decode("ascii") if isinstance(pin, bytes) else pin)
        except (UnicodeDecodeError, InvalidPin):
            return False
        return True


AUTH_PIN_RULE = PinRule("user-authentication PIN", 4, 4, "0-9", 3)
SIGN_PIN_RULE = PinRule("signing password", 6, 16, "A-Z0-9", 5)
PIN_RULES = {EF.AUTH_PIN: AUTH_PIN_RULE, EF.SIGN_PIN: SIGN_PIN_RULE}
PIN_FOR_KEY = {EF.AUTH_KEY: EF.AUTH_PIN, EF.SIGN_KEY: EF.SIGN_PIN}
# Option 6's PUK: 8 digits, 10 tries (our choice; the seed only says "a PUK").
PUK_RULE = PinRule("PUK", 8, 8, "0-9", 10)

# --- DigestInfo (RFC 8017 §9.2 note 1) ---------------------------------------------------

_DIGEST_INFO_PREFIXES = {
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "sha224": bytes.fromhex("302d300d06096086480165030402040500041c"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
_DIGEST_SIZES = {"sha1": 20, "sha224": 28, "sha256": 32, "sha384": 48, "sha512": 64}


class InvalidDigestInfo(JpkiError):
    remote_fault = True


def digest_info(hash_name: str, digest: bytes) -> bytes:
    try:
        prefix = _DIGEST_INFO_PREFIXES[hash_name]
    except KeyError:
        raise InvalidDigestInfo(f"unsupported hash {hash_name!r}") from None
    if len(digest) != _DIGEST_SIZES[hash_name]:
        raise InvalidDigestInfo(f"{hash_name} digest must be {_DIGEST_SIZES[hash_name]} bytes")
    return prefix + digest


def parse_digest_info(data: bytes) -> tuple[str, bytes]:
    """Split a DER DigestInfo into (hash name, digest); only the exact DER forms are accepted."""
    for name, prefix in _DIGEST_INFO_PREFIXES.items():
        if data.startswith(prefix) and len(data) == len(prefix) + _DIGEST_SIZES[name]:
            return name, data[len(prefix) :]
    raise InvalidDigestInfo("not a DER DigestInfo of SHA-1/224/256/384/512")


# --- public APDUs (DOMAIN.md §1) ----------------------------------------------------------

CLA_ISO = 0x00
CLA_PROPRIETARY = 0x80
CLA_CHAINING = 0x10
INS_SELECT = 0xA4
INS_READ_BINARY = 0xB0
INS_VERIFY = 0x20
INS_CHANGE_REFERENCE_DATA = 0x24
INS_RESET_RETRY_COUNTER = 0x2C
INS_COMPUTE_DIGITAL_SIGNATURE = 0x2A


def select_ap() -> CommandAPDU:
    return CommandAPDU(0x00, INS_SELECT, 0x04, 0x0C, AID)


def select_ef(fid: int) -> CommandAPDU:
    return CommandAPDU(0x00, INS_SELECT, 0x02, 0x0C, fid.to_bytes(2, "big"))


def read_binary(offset: int, length: int) -> CommandAPDU:
    if not 0 <= offset <= 0x7FFF:
        raise ValueError("READ BINARY offset must fit in 15 bits")
    return CommandAPDU(0x00, INS_READ_BINARY, offset >> 8, offset & 0xFF, le=length)


def verify(pin: bytes) -> CommandAPDU:
    return CommandAPDU(0x00, INS_VERIFY, 0x00, 0x80, pin)


def retries_left() -> CommandAPDU:
    """Empty VERIFY: the card answers ``63Cx`` without spending a try."""
    return CommandAPDU(0x00, INS_VERIFY, 0x00, 0x80)


def change_reference_data(new_pin: bytes) -> CommandAPDU:
    return CommandAPDU(0x00, INS_CHANGE_REFERENCE_DATA, 0x01, 0x80, new_pin)


def reset_retry_counter_with_puk(puk: bytes, new_pin: bytes) -> CommandAPDU:
    """ISO 7816-4 RESET RETRY COUNTER, P1 00: resetting code followed by the new PIN."""
    return CommandAPDU(0x00, INS_RESET_RETRY_COUNTER, 0x00, 0x80, puk + new_pin)


def compute_digital_signature(digest_info_bytes: bytes) -> CommandAPDU:
    return CommandAPDU(
        CLA_PROPRIETARY, INS_COMPUTE_DIGITAL_SIGNATURE, 0x00, 0x80, digest_info_bytes, le=256
    )


def tries_from_sw(sw: int) -> int | None:
    """``x`` of a ``63Cx`` status word, else None."""
    return sw & 0x0F if sw & 0xFFF0 == 0x63C0 else None


def expect_ok(response: ResponseAPDU, what: str) -> bytes:
    if response.sw != StatusWord.OK:
        raise CardError(response.sw, what)
    return response.data


# --- personalisation commands (ours; only inside the SP-TSM's SCP03 session) ----------------

INS_SET_OWNER_REFERENCE = 0x3C
INS_GENERATE_KEY_PAIR = 0x46
INS_WRITE_CERTIFICATE = 0xD6
INS_SET_TEMPORARY_PIN = 0x30
INS_BLOCK_PIN = 0x32
INS_UNBLOCK_PIN = 0x34
INS_TRANSITION_PIN = 0x36
INS_GET_PIN_STATUS = 0x38
INS_WIPE_KEYS = 0x3A

# Tags of the personalisation TLVs (one-byte tags, BER lengths).
TAG_PUBLIC_KEY = 0xA1  # SubjectPublicKeyInfo, DER
TAG_PROOF = 0x9E  # proof of possession: PKCS#1 v1.5 / SHA-256 signature
TAG_PIN = 0x81
TAG_PUK = 0x82

PROOF_CONTEXT = b"JPKI-MOBILE-KEYGEN-POP-V1"
MIN_CHALLENGE = 16
MAX_CHALLENGE = 64
MAX_CERTIFICATE = 4096
MAX_OWNER_REFERENCE = 64


class TemporaryPinMode(enum.IntEnum):
    """P1 of SET TEMPORARY PIN: the state the PIN starts in (seed options, docs)."""

    USABLE = 0x01  # options 1, 2, 5: the temporary PIN verifies (and allows signing)
    BLOCKED = 0x02  # option 3: blocked until the SP-TSM unblocks it
    INITIAL = 0x03  # option 4: initial state; only the SP-TSM transitions it
    PUK = 0x04  # option 6: blocked; the user sets the PIN with a PUK (00 2C)


class PinState(enum.IntEnum):
    """What GET PIN STATUS reports (byte 1 of its answer)."""

    NOT_SET = 0x00
    TEMPORARY = 0x01
    TEMPORARY_BLOCKED = 0x02
    INITIAL = 0x03
    INITIAL_RELEASED = 0x04
    PUK_LOCKED = 0x05
    SET = 0x06  # the user's own PIN
    SET_BLOCKED = 0x07  # the user's PIN, blocked by the SP-TSM
    EXHAUSTED = 0x08  # retry counter at zero


@dataclass(frozen=True, slots=True)
class PinStatus:
    state: PinState
    tries_left: int
    max_tries: int
    puk_tries_left: int  # 0 when there is no PUK

    def to_bytes(self) -> bytes:
        return bytes((self.state, self.tries_left, self.max_tries, self.puk_tries_left))

    @classmethod
    def from_bytes(cls, data: bytes) -> PinStatus:
        if len(data) != 4:
            raise CardError(StatusWord.WRONG_LENGTH, "GET PIN STATUS")
        try:
            state = PinState(data[0])
        except ValueError:
            raise CardError(StatusWord.WRONG_DATA, "GET PIN STATUS") from None
        return cls(state, data[1], data[2], data[3])


def encode_tlv(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        length = bytes((n,))
    elif n <= 0xFF:
        length = bytes((0x81, n))
    elif n <= 0xFFFF:
        length = b"\x82" + n.to_bytes(2, "big")
    else:
        raise ValueError("TLV value too long")
    return bytes((tag,)) + length + value


class MalformedPersonalisationData(JpkiError):
    remote_fault = True


def decode_tlvs(data: bytes) -> dict[int, bytes]:
    """Parse a flat sequence of one-byte-tag TLVs; a repeated tag is an error."""
    out: dict[int, bytes] = {}
    i = 0
    while i < len(data):
        if i + 2 > len(data):
            raise MalformedPersonalisationData("truncated TLV")
        tag, first = data[i], data[i + 1]
        i += 2
        if first < 0x80:
            length = first
        elif first in (0x81, 0x82):
            width = first - 0x80
            if i + width > len(data):
                raise MalformedPersonalisationData("truncated TLV length")
            length = int.from_bytes(data[i : i + width], "big")
            i += width
        else:
            raise MalformedPersonalisationData("unsupported TLV length form")
        if i + length > len(data):
            raise MalformedPersonalisationData("TLV value runs past the data")
        if tag in out:
            raise MalformedPersonalisationData(f"tag {tag:02X} repeated")
        out[tag] = data[i : i + length]
        i += length
    return out


def _key_p2(key_ef: int) -> int:
    if key_ef not in KEY_EFS:
        raise ValueError(f"{key_ef:04X} is not a key EF")
    return key_ef & 0xFF


def _pin_p2(pin_ef: int) -> int:
    if pin_ef not in PIN_EFS:
        raise ValueError(f"{pin_ef:04X} is not a PIN EF")
    return pin_ef & 0xFF


def generate_key_pair(key_ef: int, challenge: bytes) -> CommandAPDU:
    """Answer: A1 SubjectPublicKeyInfo, 9E proof of possession (extended length)."""
    if not MIN_CHALLENGE <= len(challenge) <= MAX_CHALLENGE:
        raise ValueError("challenge must be 16-64 bytes")
    return CommandAPDU(
        CLA_PROPRIETARY, INS_GENERATE_KEY_PAIR, 0x00, _key_p2(key_ef), challenge, le=65536,
        extended=True,
    )


def proof_message(key_ef: int, challenge: bytes, public_key_der: bytes) -> bytes:
    """What the new key signs: context, key slot, the SP-TSM's challenge, the public key."""
    return PROOF_CONTEXT + key_ef.to_bytes(2, "big") + challenge + public_key_der


@dataclass(frozen=True, slots=True)
class GeneratedPublicKey:
    public_key_der: bytes  # SubjectPublicKeyInfo
    proof: bytes


def parse_generate_key_pair(response: ResponseAPDU) -> GeneratedPublicKey:
    tlvs = decode_tlvs(expect_ok(response, "GENERATE KEY PAIR"))
    try:
        return GeneratedPublicKey(tlvs[TAG_PUBLIC_KEY], tlvs[TAG_PROOF])
    except KeyError:
        raise MalformedPersonalisationData("GENERATE KEY PAIR answer lacks A1 or 9E") from None


def write_certificate(
    ef: int, der: bytes, *, max_block: int | None = None
) -> list[CommandAPDU]:
    """WRITE CERTIFICATE as one extended APDU, or, with ``max_block``, a chain of short ones.

    Chained blocks carry CLA bit 0x10 (ISO 7816-4 §5.1.1.1) except the last.
    """
    if ef not in CERTIFICATE_EFS:
        raise ValueError(f"{ef:04X} is not a certificate EF")
    if not 0 < len(der) <= MAX_CERTIFICATE:
        raise ValueError("certificate must be 1-4096 bytes")
    p1, p2 = ef >> 8, ef & 0xFF
    if max_block is None:
        return [CommandAPDU(CLA_PROPRIETARY, INS_WRITE_CERTIFICATE, p1, p2, der, extended=True)]
    if not 1 <= max_block <= 255:
        raise ValueError("a short block carries 1-255 bytes")
    blocks = [der[i : i + max_block] for i in range(0, len(der), max_block)]
    return [
        CommandAPDU(
            CLA_PROPRIETARY | (CLA_CHAINING if n < len(blocks) - 1 else 0),
            INS_WRITE_CERTIFICATE, p1, p2, block,
        )
        for n, block in enumerate(blocks)
    ]


def set_temporary_pin(
    pin_ef: int, pin: bytes, mode: TemporaryPinMode, puk: bytes | None = None
) -> CommandAPDU:
    """Set (or reset, with a fresh retry counter) a temporary PIN in the given start state."""
    if (mode is TemporaryPinMode.PUK) != (puk is not None):
        raise ValueError("a PUK goes with mode PUK, and only with it")
    data = encode_tlv(TAG_PIN, pin) + (encode_tlv(TAG_PUK, puk) if puk is not None else b"")
    return CommandAPDU(CLA_PROPRIETARY, INS_SET_TEMPORARY_PIN, mode, _pin_p2(pin_ef), data)


def block_pin(pin_ef: int) -> CommandAPDU:
    return CommandAPDU(CLA_PROPRIETARY, INS_BLOCK_PIN, 0x00, _pin_p2(pin_ef))


def unblock_pin(pin_ef: int) -> CommandAPDU:
    return CommandAPDU(CLA_PROPRIETARY, INS_UNBLOCK_PIN, 0x00, _pin_p2(pin_ef))


def transition_pin(pin_ef: int) -> CommandAPDU:
    return CommandAPDU(CLA_PROPRIETARY, INS_TRANSITION_PIN, 0x00, _pin_p2(pin_ef))


def get_pin_status(pin_ef: int) -> CommandAPDU:
    return CommandAPDU(CLA_PROPRIETARY, INS_GET_PIN_STATUS, 0x00, _pin_p2(pin_ef), le=4)


def wipe_keys(key_ef: int | None = None) -> CommandAPDU:
    """Delete one key (with its certificate), or with None every key and certificate."""
    p2 = 0x00 if key_ef is None else _key_p2(key_ef)
    return CommandAPDU(CLA_PROPRIETARY, INS_WIPE_KEYS, 0x00, p2)


def set_owner_reference(reference: str) -> CommandAPDU:
    raw = reference.encode("utf-8")
    if not 1 <= len(raw) <= MAX_OWNER_REFERENCE:
        raise ValueError("owner reference must be 1-64 bytes of UTF-8")
    return CommandAPDU(CLA_PROPRIETARY, INS_SET_OWNER_REFERENCE, 0x00, 0x00, raw)
