"""PIN reset (FLOWS.md §4): a forgotten or blocked PIN. The card signs an application (as in
issuance step 5), the CA verifies it (6) and says what is live on this SE; only the owner of
those certificates may reset; the TSM sets fresh temporary PINs with fresh retry counters
over SCP03 and hands them to the app (as step 11); the user sets new PINs locally (12).
The certificates and keys stay.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from orchestrator.flows.card_application import (
    keep_card_signature,
    keep_verified,
    verify_application,
)
from orchestrator.flows.ending import on_end
from orchestrator.flows.lifecycle_common import (
    CA_RETRY,
    CA_TIMEOUT,
    SE_RETRY,
    SE_TIMEOUT,
    USER_TIMEOUT,
    Refused,
    key,
)
from orchestrator.lifecycle_messages import LifecycleReason, PinResetRequest
from orchestrator.messages import (
    Aborted,
    Application,
    CardSignature,
    CardSignatureRequest,
    CertificateKind,
    Outcome,
    PinOption,
    PinSettingGoAhead,
    PinsSet,
    Reason,
    Result,
    SeIdentity,
)
from orchestrator.saga import Flow, StepContext
from orchestrator.saga.machine import COMPLETED
from protocol.envelope import Message
from workers.ca import application as ca_app
from workers.ca import messages as ca
from workers.tsm import messages as tsm

FLOW_NAME = "lifecycle.pin_reset"
# reset_pin leaves a usable temporary PIN the app types itself (option 2's start state)
RESET_PIN_OPTION = PinOption.APP_TYPES_TEMPORARY


class PinResetData(msgspec.Struct, kw_only=True):
    application_id: str
    device_id: str
    app_instance_id: str
    se: SeIdentity
    certificates: list[CertificateKind]
    refusal: LifecycleReason | None = None
    nonce: bytes | None = None
    requested_at: datetime | None = None
    to_be_signed: bytes | None = None
    card_signature: bytes | None = None
    card_certificate: bytes | None = None
    person_id: str | None = None
    live: list[CertificateKind] = []  # this person's live certificates on this SE


def from_request(message: Message) -> PinResetData:
    request: PinResetRequest = message.body
    return PinResetData(
        application_id=message.envelope.saga_id or message.envelope.message_id,
        device_id=request.device_id, app_instance_id=request.app_instance_id, se=request.se,
        certificates=sorted(set(request.certificates)),
    )


pin_reset: Flow[PinResetData] = Flow(
    FLOW_NAME, PinResetData, deadline=20 * 60, device=lambda d: d.device_id,
    start_on=PinResetRequest, initial=from_request, abort_on=(Aborted,),
)


def _application(data: PinResetData) -> Application:
    if data.nonce is None or data.requested_at is None:
        raise Refused("application not prepared")
    return Application(
        application_id=data.application_id, nonce=data.nonce, device_id=data.device_id,
        app_instance_id=data.app_instance_id, se=data.se, certificates=data.certificates,
        requested_at=data.requested_at, pin_option=RESET_PIN_OPTION,
    )


@pin_reset.local
def s01_application(data: PinResetData, ctx: StepContext) -> None:
    """1. The application the card signs: a fresh nonce (injected randomness)."""
    data.nonce = ctx.rng.randbytes(32)
    data.requested_at = datetime.fromtimestamp(ctx.now, UTC)


@pin_reset.event(CardSignature, timeout=USER_TIMEOUT)
def s02_card_signature(data: PinResetData) -> CardSignatureRequest:
    """2. The user types the card's signing password and taps the card (issuance step 5)."""
    return CardSignatureRequest(application=_application(data))


@s02_card_signature.done
def _(data: PinResetData, answer: CardSignature) -> None:
    keep_card_signature(data, _application(data), answer)


@pin_reset.command(reply=ca.ApplicationVerified, timeout=CA_TIMEOUT, retry=CA_RETRY)
def s03_verify(data: PinResetData, ctx: StepContext) -> ca.VerifyApplication:
    """3. Card signature, chain, validity, revocation, nonce, SE (issuance step 6)."""
    return verify_application(data, key(ctx), ca_app.SeIdentity(cin=data.se.cin, kdd=data.se.kdd))


@s03_verify.done
def _(data: PinResetData, reply: ca.ApplicationVerified) -> None:
    keep_verified(data, reply)


@pin_reset.command(reply=ca.SeCertificates, timeout=CA_TIMEOUT, retry=CA_RETRY)
def s04_live_certificates(data: PinResetData, ctx: StepContext) -> ca.SeCertificatesQuery:
    """4. What is live on this SE, and whose."""
    return ca.SeCertificatesQuery(command_id=key(ctx), se_cin=data.se.cin)


@s04_live_certificates.done
def _(data: PinResetData, reply: ca.SeCertificates) -> None:
    data.live = sorted({CertificateKind(c.kind.value) for c in reply.certificates
                        if c.person_id == data.person_id})


@pin_reset.local
def s05_owner_only(data: PinResetData) -> None:
    """5. Only the card of the person whose certificates live on this SE resets their PINs."""
    if not set(data.certificates) <= set(data.live):
        data.refusal = LifecycleReason.NOT_THE_OWNER
        raise Refused("the card's owner has no such live certificate on this SE")


@pin_reset.command(reply=tsm.ResetPinReply, timeout=SE_TIMEOUT, retry=SE_RETRY)
def s06_reset(data: PinResetData, ctx: StepContext) -> tsm.ResetPin:
    """6. Over SCP03: a fresh temporary PIN and retry counter per PIN; the temporary PINs go
    to the app in the TSM's script message, never to us."""
    return tsm.ResetPin(command_id=key(ctx), device_id=data.device_id, se=data.se,
                        certificates=data.certificates)


@pin_reset.event(PinsSet, timeout=USER_TIMEOUT)
def s07_local_pin_setting(data: PinResetData) -> PinSettingGoAhead:
    """7. The user types the new PIN(s); the app VERIFYs the temporary PIN and CHANGEs it."""
    return PinSettingGoAhead(certificates=data.certificates, pin_option=RESET_PIN_OPTION)


@s07_local_pin_setting.done
def _(data: PinResetData, report: PinsSet) -> None:
    if set(report.certificates) != set(data.certificates):
        data.refusal = LifecycleReason.SE_ERROR


@pin_reset.local
def s08_all_set(data: PinResetData) -> None:
    if data.refusal is not None:
        raise Refused("not every PIN was set")


_REASONS = {
    LifecycleReason.NOT_THE_OWNER: Reason.BAD_APPLICATION,
    LifecycleReason.SE_ERROR: Reason.PIN_SETTING_FAILED,
}


@on_end(FLOW_NAME)
def ending(data: PinResetData, status: str, reason: str | None) -> Result:
    """The app runs a PIN reset as it runs issuance's phase 3, so it is told the same way."""
    if status == COMPLETED:
        return Result(outcome=Outcome.ISSUED, phase=4, certificates=data.live)
    text = reason or ""
    if data.refusal is not None:
        return Result(outcome=Outcome.REFUSED, phase=4, reason=_REASONS[data.refusal])
    if text.startswith("aborted by"):
        return Result(outcome=Outcome.CANCELLED, phase=4, reason=Reason.USER_CANCELLED)
    if text.startswith("s03_verify"):
        return Result(outcome=Outcome.REFUSED, phase=4, reason=Reason.BAD_CARD_SIGNATURE)
    if "timeout" in text or "deadline" in text:
        return Result(outcome=Outcome.FAILED, phase=4, reason=Reason.TIMEOUT)
    return Result(outcome=Outcome.FAILED, phase=4, reason=Reason.SE_ERROR)
