"""The phase-3 state check (FLOWS.md §3, the seed's supplement ①), as a pure decision.

Input: the person's phone certificates that are not revoked (other than this saga's), the
SE of the application and whether the card certificate is still usable. Output: the branch
and the serials the orchestrator acts on.

| existing phone certificates             | branch            | serials                          |
|-----------------------------------------|-------------------|----------------------------------|
| none (or only expired)                  | NEW_ISSUANCE      | –                                |
| active or held, on another SE           | MODEL_CHANGE      | revoke_after_success, old_se     |
| active on this SE (app reinstalled)     | REISSUE_SAME_SE   | revoke_now (applet was cleaned)  |
| held on this SE (phone found)           | FOUND_ON_SAME_SE  | release (auth), revoke_now (sign)|
| card certificate revoked or expired     | RENEW_CARD_FIRST  | – (refuse)                       |

Certificates on this SE win over those on another: with one phone per person a mix only
arises mid-model-change, and what is on the phone in hand is what the user sees.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from workers.ca.profiles import CertType
from workers.ca.revocation import Status


class Branch(enum.StrEnum):
    NEW_ISSUANCE = "new_issuance"
    MODEL_CHANGE = "model_change"
    REISSUE_SAME_SE = "reissue_same_se"
    FOUND_ON_SAME_SE = "found_on_same_se"
    RENEW_CARD_FIRST = "renew_card_first"


@dataclass(frozen=True, slots=True)
class ExistingCertificate:
    serial: str
    cert_type: CertType
    se_cin: str
    status: Status
    expired: bool


@dataclass(frozen=True, slots=True)
class StateCheck:
    branch: Branch
    revoke_now: tuple[str, ...] = ()  # before issuing on this SE
    release: tuple[str, ...] = ()  # held authentication certificate of a found phone
    revoke_after_success: tuple[str, ...] = ()  # the old phone's, once this issuance succeeds
    old_se: tuple[str, ...] = ()  # SEs whose applet is deleted when next reachable


def decide_branch(
    se_cin: str, existing: Sequence[ExistingCertificate], *, card_usable: bool
) -> StateCheck:
    if not card_usable:
        return StateCheck(Branch.RENEW_CARD_FIRST)
    live = [c for c in existing if c.status is not Status.REVOKED and not c.expired]
    here = [c for c in live if c.se_cin == se_cin]
    elsewhere = [c for c in live if c.se_cin != se_cin]
    if any(c.status is Status.HELD for c in here):
        return StateCheck(
            Branch.FOUND_ON_SAME_SE,
            release=_serials(
                c for c in here if c.cert_type is CertType.AUTH and c.status is Status.HELD
            ),
            revoke_now=_serials(c for c in here if c.cert_type is CertType.SIGN),
            revoke_after_success=_serials(elsewhere),
            old_se=_ses(elsewhere),
        )
    if here:
        return StateCheck(
            Branch.REISSUE_SAME_SE,
            revoke_now=_serials(here),
            revoke_after_success=_serials(elsewhere),
            old_se=_ses(elsewhere),
        )
    if elsewhere:
        return StateCheck(
            Branch.MODEL_CHANGE, revoke_after_success=_serials(elsewhere), old_se=_ses(elsewhere)
        )
    return StateCheck(Branch.NEW_ISSUANCE)


def _serials(certificates: Iterable[ExistingCertificate]) -> tuple[str, ...]:
    return tuple(sorted(c.serial for c in certificates))


def _ses(certificates: Sequence[ExistingCertificate]) -> tuple[str, ...]:
    return tuple(sorted({c.se_cin for c in certificates}))
