"""The project's error taxonomy and ISO 7816-4 status words as typed errors.

Two axes (STYLE §5): whose fault (the remote's vs ours) and what to do (retry a transient
error, compensate a rejected one). Replies carry ``ErrorCode`` values, never exception text
that could hold a secret.
"""

from __future__ import annotations

import enum


class Disposition(enum.StrEnum):
    TRANSIENT = "transient"  # try again later: timeouts, broker hiccups, drifted counters
    REJECTED = "rejected"  # will not succeed by retrying: compensate


class JpkiError(Exception):
    """Base of every error raised on purpose by project code."""

    disposition: Disposition = Disposition.REJECTED
    remote_fault: bool = False


class MalformedAPDU(JpkiError):
    """Bytes that do not parse as a command or response APDU."""

    remote_fault = True


class MalformedTLV(JpkiError):
    """Bytes that do not parse as BER-TLV."""

    remote_fault = True


class SecureChannelError(JpkiError):
    """SCP03 failure; the session that raised it is dead."""

    remote_fault = True


class CryptogramMismatch(SecureChannelError):
    """A card or host cryptogram (or predicted card challenge) did not verify (GP Amd D §6.2.2)."""


class MacMismatch(SecureChannelError):
    """A C-MAC or R-MAC did not verify (GP Amd D §6.2.4, §6.2.5)."""


class SequenceCounterMismatch(SecureChannelError):
    """The SE used another sequence counter than the one predicted for an offline session.

    Transient: the TSM resynchronises its record from ``actual`` and computes the script again.
    """

    disposition = Disposition.TRANSIENT

    def __init__(self, expected: int, actual: int) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"sequence counter {actual:06X}, predicted {expected:06X}")


class SecureChannelClosed(SecureChannelError):
    """A session object was used after it failed, was closed, or out of order (our fault)."""

    remote_fault = False


class StatusWord(enum.IntEnum):
    """Status words used by the JPKI applet and the card manager (ISO 7816-4 §5.6, GP §11)."""

    OK = 0x9000
    WRONG_LENGTH = 0x6700
    LOGICAL_CHANNEL_NOT_SUPPORTED = 0x6881
    SECURE_MESSAGING_NOT_SUPPORTED = 0x6882
    SECURITY_STATUS_NOT_SATISFIED = 0x6982
    AUTHENTICATION_BLOCKED = 0x6983
    REFERENCE_DATA_BLOCKED = 0x6984  # JPKI: PIN blocked
    CONDITIONS_NOT_SATISFIED = 0x6985
    COMMAND_NOT_ALLOWED = 0x6986
    SM_DATA_OBJECTS_MISSING = 0x6987
    SM_DATA_OBJECTS_INCORRECT = 0x6988
    WRONG_DATA = 0x6A80
    FUNCTION_NOT_SUPPORTED = 0x6A81
    FILE_NOT_FOUND = 0x6A82
    NOT_ENOUGH_MEMORY = 0x6A84
    INCORRECT_P1P2 = 0x6A86
    REFERENCED_DATA_NOT_FOUND = 0x6A88
    FILE_ALREADY_EXISTS = 0x6A89
    WRONG_P1P2 = 0x6B00
    INS_NOT_SUPPORTED = 0x6D00
    CLA_NOT_SUPPORTED = 0x6E00
    UNKNOWN = 0x6F00


def wrong_pin(tries_left: int) -> int:
    """``63Cx``: wrong PIN (or, for an empty VERIFY, the count) with ``x`` tries left."""
    if not 0 <= tries_left <= 0xF:
        raise ValueError("tries left must fit in one nibble")
    return 0x63C0 | tries_left


class CardError(JpkiError):
    """A non-9000 status word returned by a card, kept with the command that caused it."""

    remote_fault = True

    def __init__(self, sw: int, command: str = "") -> None:
        self.sw = sw
        self.command = command
        super().__init__(f"{command or 'command'} failed with SW {sw:04X}")

    @property
    def tries_left(self) -> int | None:
        return self.sw & 0x0F if self.sw & 0xFFF0 == 0x63C0 else None
