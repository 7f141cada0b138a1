"""Messages of the life-cycle flows (FLOWS.md §4) between the app, the call centre and the
orchestrator. New issuance's messages (``orchestrator/messages.py``) are reused where a
life-cycle flow repeats a piece of issuance: the card signature, the TSM's temporary PINs,
local PIN setting and ``app.cmd.result``.

From the app (``app.event.*``, via the gateway; each starts a saga whose id is the
envelope's ``saga_id``, chosen by the app)::

    app.event.pin_changed        PIN change done on the SE: recorded, nothing else
    app.event.pin_reset          forgotten / blocked PIN: card signature → reset → local setting
    app.event.disposal           dispose of the phone's certificates (then a signed confirmation)
    app.event.online             (orchestrator/messages.Online) the app connected while idle

From the call centre (``callcentre.cmd.*``, bound to the ``orchestrator`` queue): every
request is HMAC-signed by an operator key the orchestrator knows (``orchestrator/callcentre.py``);
the saga's first step checks it, so nothing is done for an unauthenticated request.

What never appears here: a PIN, a password, a PUK, a temporary PIN.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated

import msgspec

from orchestrator.messages import (
    ApplicationId,
    CertificateKind,
    Certificates,
    DeviceId,
    Nonce,
    PinOption,
    SeIdentity,
)
from protocol.envelope import message_type

RequestId = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]
OperatorId = Annotated[str, msgspec.Meta(pattern="^[a-z0-9_.-]{1,32}$")]
Serial = Annotated[str, msgspec.Meta(pattern="^[0-9A-F]{1,40}$")]
Mac = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]


class LifecycleFlow(enum.StrEnum):
    PIN_CHANGE = "pin_change"
    PIN_RESET = "pin_reset"
    DISPOSAL = "disposal"
    ONLINE = "online"
    LOSS = "loss"
    TEMPORARY_LOSS = "temporary_loss"
    FOUND = "found"
    FAILURE = "failure"
    CARD_CASCADE = "card_cascade"


class LifecycleOutcome(enum.StrEnum):
    DONE = "done"
    REFUSED = "refused"  # not authenticated, not the owner, nothing to do
    FAILED = "failed"  # a step failed; compensations ran


class LifecycleReason(enum.StrEnum):
    BAD_CONFIRMATION = "bad_confirmation"  # the disposal confirmation did not verify
    NOT_AUTHENTICATED = "not_authenticated"  # a call-centre request without a valid MAC
    NOTHING_LIVE = "nothing_live"  # no live certificate on this SE
    NOT_THE_OWNER = "not_the_owner"  # the card is not the owner's of this SE's certificates
    CARD_SIGNATURE = "card_signature"  # the card signature was refused
    SE_ERROR = "se_error"
    TIMEOUT = "timeout"
    USER_CANCELLED = "user_cancelled"
    INTERNAL = "internal"


# ---------------------------------------------------------------------------------------
# app → orchestrator


@message_type("app.event.pin_changed", 1)
class PinChanged(msgspec.Struct, frozen=True, kw_only=True):
    """The user changed a PIN on the SE (VERIFY old, CHANGE REFERENCE DATA): which, not what."""

    device_id: DeviceId
    se: SeIdentity
    kind: CertificateKind
    changed_at: datetime


@message_type("app.event.pin_reset", 1)
class PinResetRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Forgotten or blocked PIN(s): the saga asks for a card signature, then has the TSM set
    fresh temporary PINs, then the user sets new ones locally (issuance steps 5, 6, 11, 12)."""

    device_id: DeviceId
    app_instance_id: ApplicationId
    se: SeIdentity
    certificates: Certificates


@message_type("app.event.disposal", 1)
class DisposalRequest(msgspec.Struct, frozen=True, kw_only=True):
    """The user disposes of the phone's certificates; a signed confirmation follows."""

    device_id: DeviceId
    app_instance_id: ApplicationId
    se: SeIdentity


@message_type("app.event.disposal_confirmed", 1)
class DisposalConfirmed(msgspec.Struct, frozen=True, kw_only=True):
    """The phone's own key signed ``DisposalChallenge.to_be_signed()`` after the user typed
    the phone's signing password (or, with the authentication certificate only, its PIN)."""

    kind: CertificateKind
    signature: Annotated[bytes, msgspec.Meta(max_length=1024)]
    certificate: Annotated[bytes, msgspec.Meta(max_length=8192)]


@message_type("app.event.reissue_accepted", 1)
class ReissueAccepted(msgspec.Struct, frozen=True, kw_only=True):
    """The user agreed to renew the certificate(s) a found phone needs (card signature next)."""

    certificates: Certificates
    app_instance_id: ApplicationId  # the card will sign an application naming this app


# ---------------------------------------------------------------------------------------
# orchestrator → app (device.<device_id>)


@message_type("app.cmd.disposal_challenge", 1)
class DisposalChallenge(msgspec.Struct, frozen=True, kw_only=True):
    device_id: DeviceId
    se: SeIdentity
    nonce: Nonce

    def to_be_signed(self) -> bytes:
        """What the phone key signs (SHA-256, PKCS#1 v1.5): fixed JSON of this challenge."""
        return b"jpki-mobile disposal\n" + msgspec.json.encode(self)


@message_type("app.cmd.reissue", 1)
class ReissuePrompt(msgspec.Struct, frozen=True, kw_only=True):
    """A found phone: the signing certificate was revoked; renew it (card signature,
    new key, local password setting). The authentication certificate is released."""

    certificates: Certificates
    pin_option: PinOption


@message_type("app.cmd.lifecycle_result", 1)
class LifecycleResult(msgspec.Struct, frozen=True, kw_only=True):
    """How a life-cycle saga ended, as the phone shows it."""

    flow: LifecycleFlow
    outcome: LifecycleOutcome
    reason: LifecycleReason | None = None
    applet_deleted: bool = False  # the phone holds no JPKI applet any more (back to phase 1)
    certificates: list[CertificateKind] = []  # live on this phone after the saga


# ---------------------------------------------------------------------------------------
# call centre → orchestrator (callcentre.cmd.*)


class Phone(msgspec.Struct, frozen=True, kw_only=True):
    """The person's registered phone, as the call centre's records name it."""

    device_id: DeviceId
    se: SeIdentity


class CallCentreRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Common fields: who asks, when, and the MAC over everything else (see callcentre.py)."""

    request_id: RequestId  # also the saga id: a re-sent request lands on the same saga
    operator: OperatorId
    issued_at: datetime
    mac: Mac = b"\0" * 32


@message_type("callcentre.cmd.loss", 1)
class LossReport(CallCentreRequest, frozen=True, kw_only=True):
    """Lost for good: revoke both; the applet is deleted when the phone next connects."""

    phone: Phone


@message_type("callcentre.cmd.failure", 1)
class FailureReport(CallCentreRequest, frozen=True, kw_only=True):
    """Broken phone: revoke both; a repaired phone's stale applet goes on its next connection
    (or in phase 2 of an issuance on it)."""

    phone: Phone


@message_type("callcentre.cmd.temporary_loss", 1)
class TemporaryLossReport(CallCentreRequest, frozen=True, kw_only=True):
    """Suspend both; revoked if not found within the orchestrator's set period (a durable
    timer: ``orchestrator/flows/temporary_loss.py``)."""

    phone: Phone


@message_type("callcentre.cmd.found", 1)
class FoundReport(CallCentreRequest, frozen=True, kw_only=True):
    """The phone is back: release the authentication certificate, revoke the signing one and
    reissue it on the same SE. Sent to the temporary-loss saga too (``temporary_loss_id``),
    which stops its not-found timer."""

    phone: Phone
    temporary_loss_id: RequestId
    pin_option: PinOption = PinOption.INITIAL_STATE


@message_type("callcentre.cmd.card_cascade", 1)
class CardCascadeReport(CallCentreRequest, frozen=True, kw_only=True):
    """A card certificate was revoked (move, marriage: the phone signing certificate follows;
    card renewed: both phone certificates follow)."""

    card_serial: Serial
    renewed: bool = False


CALL_CENTRE_TYPES: tuple[type[CallCentreRequest], ...] = (
    LossReport, FailureReport, TemporaryLossReport, FoundReport, CardCascadeReport,
)
