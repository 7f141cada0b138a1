"""The seed's six PIN-setting options as strategies of the issuance saga.

One row per ``PinOption`` says what each party does in steps 10–12 of FLOWS.md §1:

- the SP-TSM, at step 10, sets the temporary PIN in a mode (``tsm_mode``) and, at step 11,
  releases it (``release``: nothing, lift the block, or the special transition);
- the app, at step 12, either types the temporary PIN itself or asks the user to type the
  code the user was given (``code_typed_by_user``: the temporary PIN for option 1, the PUK
  for option 6), and asks for the user's real PIN either after the download (the normal
  sequence) or already at the application (``real_pin_at_application``, option 5);
- the first PIN goes onto the SE with VERIFY + CHANGE REFERENCE DATA, or for option 6 with
  RESET RETRY COUNTER (PUK ‖ new PIN).

The saga's messages do not change with the option (the option travels in them); the app
(``device_sim/app.py``) and the SP-TSM (``workers/tsm/scripts.py``) read it from here or
from their own tables, which ``tests/test_pin_options.py`` checks agree with this one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from orchestrator.messages import PinOption
from protocol.jpki import TemporaryPinMode


class Release(enum.StrEnum):
    """What the SP-TSM does at step 11, just before the user's PIN is set."""

    NOTHING = "nothing"
    UNBLOCK = "unblock"  # option 3: lift the block set with the temporary PIN
    TRANSITION = "transition"  # option 4: out of the special initial state


class UserCode(enum.StrEnum):
    """The code the user is handed and types at step 12, if any."""

    NONE = "none"
    TEMPORARY_PIN = "temporary_pin"  # option 1
    PUK = "puk"  # option 6


@dataclass(frozen=True, slots=True)
class PinStrategy:
    option: PinOption
    title: str
    tsm_mode: TemporaryPinMode
    release: Release
    user_code: UserCode
    real_pin_at_application: bool

    @property
    def code_typed_by_user(self) -> bool:
        return self.user_code is not UserCode.NONE

    @property
    def sets_pin_with_puk(self) -> bool:
        return self.user_code is UserCode.PUK


STRATEGIES: dict[PinOption, PinStrategy] = {
    s.option: s
    for s in (
        PinStrategy(PinOption.USER_TYPES_TEMPORARY, "user types the temporary PIN",
                    TemporaryPinMode.USABLE, Release.NOTHING, UserCode.TEMPORARY_PIN, False),
        PinStrategy(PinOption.APP_TYPES_TEMPORARY, "app types the temporary PIN",
                    TemporaryPinMode.USABLE, Release.NOTHING, UserCode.NONE, False),
        PinStrategy(PinOption.BLOCKED_UNTIL_RELEASED, "as 2, PIN blocked until the TSM lifts it",
                    TemporaryPinMode.BLOCKED, Release.UNBLOCK, UserCode.NONE, False),
        PinStrategy(PinOption.INITIAL_STATE, "special initial state, TSM transition",
                    TemporaryPinMode.INITIAL, Release.TRANSITION, UserCode.NONE, False),
        PinStrategy(PinOption.REAL_PIN_AT_APPLICATION, "real PIN typed at application",
                    TemporaryPinMode.USABLE, Release.NOTHING, UserCode.NONE, True),
        PinStrategy(PinOption.PUK, "user sets the PIN with a PUK",
                    TemporaryPinMode.PUK, Release.NOTHING, UserCode.PUK, False),
    )
}


def strategy(option: PinOption) -> PinStrategy:
    return STRATEGIES[PinOption(option)]
