"""The secure element a phone holds: a card manager behind a byte-level APDU interface.

``transmit`` is what an OMAPI / PC/SC reader does; ``run_script`` is what the phone does
with an SP-TSM script: send each APDU in order and stop at the first status word the TSM
did not expect. The whole state (registry, keys, counters, applet data) is JSON, so that
it survives an app reinstall and a factory reset exactly as a real eSE would.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from device_sim.se.card_manager import (
    ISD_AID,
    ISD_PRIVILEGES,
    SP_SD_PRIVILEGES,
    CardIdentity,
    CardManager,
    ChallengeMode,
    KeySet,
    LoadFile,
    SecurityDomain,
    cplc_for,
)
from protocol.apdu import CommandAPDU, ResponseAPDU
from protocol.errors import JpkiError, MalformedAPDU, StatusWord

STATE_FORMAT = 1
_WRONG_LENGTH = ResponseAPDU.status(StatusWord.WRONG_LENGTH).to_bytes()
DEFAULT_IIN = bytes.fromhex("42")  # placeholder issuer identification number
# The SP-TSM's security domain on every simulated phone (an AID of our own).
SP_SD_AID = bytes.fromhex("A000000151535054534D")


class SecureElementStateError(JpkiError):
    """A saved secure-element state that cannot be restored (wrong format, damaged)."""


class ScriptCommand(msgspec.Struct, frozen=True):
    """One step of an SP-TSM script: the APDU and the status words that let it continue."""

    apdu: bytes
    expect: tuple[int, ...] = (StatusWord.OK,)


class ScriptOutcome(msgspec.Struct, frozen=True):
    """The responses of the steps that ran; ``completed`` is False when one was unexpected."""

    responses: tuple[bytes, ...]
    completed: bool


@dataclass(frozen=True, slots=True)
class SeIdentity:
    cin: bytes
    kdd: bytes
    sd_aid: bytes


class SecureElement:
    """A GlobalPlatform SE: card manager, ISD and the SP-TSM's security domain."""

    def __init__(self, manager: CardManager, sp_sd_aid: bytes = SP_SD_AID) -> None:
        self.manager = manager
        self.sp_sd_aid = sp_sd_aid

    @classmethod
    def manufacture(
        cls,
        *,
        cin: bytes,
        isd_keys: KeySet,
        sp_sd_keys: KeySet,
        load_files: Sequence[LoadFile],
        kdd: bytes | None = None,
        challenge_mode: ChallengeMode = ChallengeMode.PSEUDO_RANDOM,
        sp_sd_aid: bytes = SP_SD_AID,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> SecureElement:
        """A fresh SE as the phone leaves the factory: empty registry, keys installed."""
        identity = CardIdentity(cin=cin, iin=DEFAULT_IIN, kdd=kdd or cin, cplc=cplc_for(cin))
        isd = SecurityDomain(ISD_AID, {isd_keys.kvn: isd_keys}, int(ISD_PRIVILEGES), challenge_mode)
        sp_sd = SecurityDomain(
            sp_sd_aid,
            {sp_sd_keys.kvn: sp_sd_keys},
            int(SP_SD_PRIVILEGES),
            challenge_mode,
            associated_sd=ISD_AID,
        )
        manager = CardManager(identity, [isd, sp_sd], list(load_files), random_bytes=random_bytes)
        return cls(manager, sp_sd_aid)

    @property
    def identity(self) -> SeIdentity:
        ident = self.manager.identity
        return SeIdentity(cin=ident.cin, kdd=ident.kdd, sd_aid=self.sp_sd_aid)

    def transmit(self, apdu: bytes) -> bytes:
        try:
            command = CommandAPDU.from_bytes(apdu)
        except MalformedAPDU:
            return _WRONG_LENGTH
        response = self.manager.process(command)
        return response.data + response.sw.to_bytes(2, "big")

    def run_script(self, script: Iterable[ScriptCommand]) -> ScriptOutcome:
        """Run the steps in order; stop at the first unexpected SW.

        The channel stays open between scripts (the SP-TSM's second round of a two-round
        session continues the first); a script that needs a fresh start begins with SELECT.
        """
        responses: list[bytes] = []
        for step in script:
            response = self.transmit(step.apdu)
            responses.append(response)
            if int.from_bytes(response[-2:], "big") not in step.expect:
                return ScriptOutcome(tuple(responses), completed=False)
        return ScriptOutcome(tuple(responses), completed=True)

    # ------------------------------------------------------------------ persistence

    def to_json(self) -> str:
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "sp_sd_aid": self.sp_sd_aid.hex(),
            "card": self.manager.to_state(),
        }
        return json.dumps(state, sort_keys=True)

    @classmethod
    def from_json(
        cls,
        text: str,
        load_files: Sequence[LoadFile],
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> SecureElement:
        try:
            state: Mapping[str, Any] = json.loads(text)
            if state.get("format") != STATE_FORMAT:
                raise SecureElementStateError(
                    f"unsupported secure element state format {state.get('format')!r}"
                )
            manager = CardManager.from_state(
                state["card"], list(load_files), random_bytes=random_bytes
            )
            return cls(manager, bytes.fromhex(state["sp_sd_aid"]))
        except SecureElementStateError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            # Names the defect's kind only: the state holds keys.
            kind = type(exc).__name__
            raise SecureElementStateError(f"damaged secure element state ({kind})") from None

    def save(self, path: Path) -> None:
        """Write the state atomically: a crash mid-write never leaves half an SE."""
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, load_files: Sequence[LoadFile]) -> SecureElement:
        return cls.from_json(path.read_text(), load_files)
