"""A JPKI PIN (or signing password) and its state machine.

One object per PIN EF (``0018``, ``001B``). It holds what the applet needs to answer
VERIFY, CHANGE REFERENCE DATA and RESET RETRY COUNTER, and the states the six PIN-setting
options of the seed need (``docs/personalisation.md`` draws the diagram):

- ``NOT_SET`` → SET TEMPORARY PIN (SP-TSM) with a mode:
  ``USABLE`` (options 1, 2, 5) → ``TEMPORARY``: the temporary PIN verifies, and a key can
  sign with it — the weakness the seed rates options 1 and 2 down for;
  ``BLOCKED`` (option 3) → ``TEMPORARY`` blocked by the SP-TSM until UNBLOCK;
  ``INITIAL`` (option 4) → ``INITIAL``: nothing verifies until the SP-TSM's TRANSITION,
  then ``INITIAL_RELEASED``: the temporary PIN verifies only to be changed; no signing;
  ``PUK`` (option 6) → ``PUK_LOCKED``: only RESET RETRY COUNTER with the PUK sets the PIN.
- CHANGE REFERENCE DATA after a successful VERIFY → ``SET`` (the user's own PIN).
- Wrong tries count down (``63Cx``); at zero every VERIFY answers ``6984``.

Every method answers with an ISO 7816-4 status word; nothing here raises on card input.
The PIN values are never in repr, logs or exception text.
"""

from __future__ import annotations

import enum
import hmac
from dataclasses import dataclass, field
from typing import Any

from protocol.errors import StatusWord, wrong_pin
from protocol.jpki import PUK_RULE, PinRule, PinState, PinStatus, TemporaryPinMode


class Phase(enum.StrEnum):
    NOT_SET = "not_set"
    TEMPORARY = "temporary"
    INITIAL = "initial"
    INITIAL_RELEASED = "initial_released"
    PUK_LOCKED = "puk_locked"
    SET = "set"


_OK = int(StatusWord.OK)
_BLOCKED = int(StatusWord.REFERENCE_DATA_BLOCKED)
_NOT_FOUND = int(StatusWord.REFERENCED_DATA_NOT_FOUND)
_CONDITIONS = int(StatusWord.CONDITIONS_NOT_SATISFIED)
_SECURITY = int(StatusWord.SECURITY_STATUS_NOT_SATISFIED)
_WRONG_DATA = int(StatusWord.WRONG_DATA)


@dataclass(slots=True)
class Pin:
    rule: PinRule
    phase: Phase = Phase.NOT_SET
    tries_left: int = 0
    blocked_by_tsm: bool = False
    puk_tries_left: int = 0
    _value: bytes = field(default=b"", repr=False)
    _puk: bytes = field(default=b"", repr=False)
    # Volatile: cleared by logout (re-SELECT of the application) and by every state change.
    verified: bool = field(default=False, compare=False)

    # --- queries -------------------------------------------------------------------------

    @property
    def state(self) -> PinState:
        if self.phase is Phase.NOT_SET:
            return PinState.NOT_SET
        if self.phase is Phase.PUK_LOCKED:
            return PinState.PUK_LOCKED
        if self.phase is Phase.INITIAL:
            return PinState.INITIAL
        if self.tries_left == 0:
            return PinState.EXHAUSTED
        if self.phase is Phase.INITIAL_RELEASED:
            return PinState.INITIAL_RELEASED
        if self.phase is Phase.TEMPORARY:
            return PinState.TEMPORARY_BLOCKED if self.blocked_by_tsm else PinState.TEMPORARY
        return PinState.SET_BLOCKED if self.blocked_by_tsm else PinState.SET

    def status(self) -> PinStatus:
        return PinStatus(self.state, self.tries_left, self.rule.max_tries, self.puk_tries_left)

    @property
    def allows_signing(self) -> bool:
        """A key behind this PIN may sign: verified, and not a PIN that is only to be changed."""
        return (
            self.verified
            and not self.blocked_by_tsm
            and self.phase in (Phase.TEMPORARY, Phase.SET)
        )

    @property
    def _unusable(self) -> bool:
        return (
            self.blocked_by_tsm
            or self.tries_left == 0
            or self.phase in (Phase.INITIAL, Phase.PUK_LOCKED)
        )

    # --- the user's commands (public APDUs) -------------------------------------------------

    def retries(self) -> int:
        """Empty VERIFY. ``63C0`` for a counter run down, ``6984`` for a PIN the TSM holds."""
        if self.phase is Phase.NOT_SET:
            return _NOT_FOUND
        if self.phase in (Phase.INITIAL, Phase.PUK_LOCKED) or self.blocked_by_tsm:
            return _BLOCKED
        return wrong_pin(self.tries_left)

    def verify(self, candidate: bytes) -> int:
        if self.phase is Phase.NOT_SET:
            return _NOT_FOUND
        if self._unusable:
            self.verified = False
            return _BLOCKED
        if hmac.compare_digest(candidate, self._value):
            self.tries_left = self.rule.max_tries
            self.verified = True
            return _OK
        self.tries_left -= 1
        self.verified = False
        return wrong_pin(self.tries_left)

    def change(self, new_value: bytes) -> int:
        """CHANGE REFERENCE DATA: allowed only right after a successful VERIFY of this PIN."""
        if not self.verified or self._unusable:
            return _SECURITY
        if not self.rule.accepts(new_value):
            return _WRONG_DATA
        self._value = bytes(new_value)
        self.phase = Phase.SET
        self.tries_left = self.rule.max_tries
        return _OK

    def reset_with_puk(self, puk: bytes, new_value: bytes) -> int:
        """RESET RETRY COUNTER (00 2C, P1 00): option 6's way to set the first PIN."""
        if self.phase is not Phase.PUK_LOCKED:
            return _CONDITIONS
        if self.puk_tries_left == 0:
            return _BLOCKED
        if not hmac.compare_digest(puk, self._puk):
            self.puk_tries_left -= 1
            return wrong_pin(self.puk_tries_left)
        if not self.rule.accepts(new_value):
            return _WRONG_DATA
        self._value = bytes(new_value)
        self._puk = b""
        self.puk_tries_left = 0
        self.phase = Phase.SET
        self.tries_left = self.rule.max_tries
        self.verified = False
        return _OK

    def logout(self) -> None:
        self.verified = False

    # --- the SP-TSM's commands (personalisation, inside SCP03) -------------------------------

    def set_temporary(self, value: bytes, mode: TemporaryPinMode, puk: bytes = b"") -> int:
        """Set a temporary PIN in the mode's start state with a full retry counter.

        Also the PIN reset of a forgotten or blocked PIN: whatever the state, the new
        temporary PIN replaces the old one and the counter is reset.
        """
        if not self.rule.accepts(value):
            return _WRONG_DATA
        if (mode is TemporaryPinMode.PUK) != bool(puk) or (puk and not PUK_RULE.accepts(puk)):
            return _WRONG_DATA
        self._value = bytes(value)
        self.tries_left = self.rule.max_tries
        self.verified = False
        self.blocked_by_tsm = mode is TemporaryPinMode.BLOCKED
        self._puk = bytes(puk)
        self.puk_tries_left = PUK_RULE.max_tries if puk else 0
        self.phase = {
            TemporaryPinMode.USABLE: Phase.TEMPORARY,
            TemporaryPinMode.BLOCKED: Phase.TEMPORARY,
            TemporaryPinMode.INITIAL: Phase.INITIAL,
            TemporaryPinMode.PUK: Phase.PUK_LOCKED,
        }[mode]
        return _OK

    def block(self) -> int:
        if self.phase not in (Phase.TEMPORARY, Phase.SET) or self.blocked_by_tsm:
            return _CONDITIONS
        self.blocked_by_tsm = True
        self.verified = False
        return _OK

    def unblock(self) -> int:
        """Option 3's release, just before the user sets the PIN."""
        if not self.blocked_by_tsm:
            return _CONDITIONS
        self.blocked_by_tsm = False
        return _OK

    def transition(self) -> int:
        """Option 4's release: the initial state becomes settable (and only settable)."""
        if self.phase is not Phase.INITIAL:
            return _CONDITIONS
        self.phase = Phase.INITIAL_RELEASED
        return _OK

    def clear(self) -> None:
        self._value = b""
        self._puk = b""
        self.phase = Phase.NOT_SET
        self.tries_left = 0
        self.puk_tries_left = 0
        self.blocked_by_tsm = False
        self.verified = False

    # --- persistence (inside the SE's own state only) ---------------------------------------

    def to_state(self) -> dict[str, Any]:
        return {
            "phase": self.phase.value,
            "tries_left": self.tries_left,
            "blocked_by_tsm": self.blocked_by_tsm,
            "puk_tries_left": self.puk_tries_left,
            "value": self._value.hex(),
            "puk": self._puk.hex(),
        }

    @classmethod
    def from_state(cls, rule: PinRule, state: dict[str, Any]) -> Pin:
        return cls(
            rule,
            Phase(state["phase"]),
            int(state["tries_left"]),
            bool(state["blocked_by_tsm"]),
            int(state["puk_tries_left"]),
            bytes.fromhex(state["value"]),
            bytes.fromhex(state["puk"]),
        )
