"""Found (FLOWS.md §4 and §3 "suspended on this SE (phone found)"), from the call centre:
release the authentication certificate, revoke the signing certificate and reissue it on
the same SE. The user takes part on the phone for the reissue: a card signature, then a
new signing password set locally — issuance steps 5, 6 and 8–12 for one certificate.

The call centre sends the same signed report to the temporary-loss saga, which stops its
not-found timer (``temporary_loss.py``).
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from orchestrator import callcentre
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
from orchestrator.lifecycle_messages import FoundReport, ReissueAccepted, ReissuePrompt
from orchestrator.messages import (
    Aborted,
    Application,
    CardSignature,
    CardSignatureRequest,
    CertificateKind,
    Outcome,
    PinSettingGoAhead,
    PinsSet,
    Reason,
    Result,
)
from orchestrator.saga import Flow, StepContext
from orchestrator.saga.machine import COMPLETED
from protocol.envelope import Message
from workers.ca import application as ca_app
from workers.ca import messages as ca
from workers.ca.profiles import CertType
from workers.ca.revocation import Cause, Status
from workers.tsm import messages as tsm

FLOW_NAME = "lifecycle.found"
SIGN = [CertificateKind.SIGN]


class FoundData(msgspec.Struct, kw_only=True):
    report: FoundReport
    released: list[str] = []
    revoked: list[str] = []
    reissue: bool = False
    app_instance_id: str | None = None
    nonce: bytes | None = None
    requested_at: datetime | None = None
    to_be_signed: bytes | None = None
    card_signature: bytes | None = None
    card_certificate: bytes | None = None
    person_id: str | None = None
    public_keys: list[tsm.PublicKey] = []
    issued: list[ca.Certificate] = []


def from_report(message: Message) -> FoundData:
    return FoundData(report=message.body)


found: Flow[FoundData] = Flow(
    FLOW_NAME, FoundData, deadline=30 * 60, device=lambda d: d.report.phone.device_id,
    start_on=FoundReport, initial=from_report, abort_on=(Aborted,),
)


def _se(data: FoundData) -> ca_app.SeIdentity:
    se = data.report.phone.se
    return ca_app.SeIdentity(cin=se.cin, kdd=se.kdd)


@found.local
def s01_authenticate(data: FoundData, ctx: StepContext) -> None:
    """1. A known operator signed this report, lately."""
    callcentre.authenticate(data.report, ctx.now)


@found.command(reply=ca.ReleaseDone, timeout=CA_TIMEOUT, retry=CA_RETRY)
def s02_release_auth(data: FoundData, ctx: StepContext) -> ca.Release:
    """2. Lift the hold of the authentication certificate."""
    se_cin = data.report.phone.se.cin
    return ca.Release(command_id=key(ctx),
                      selection=ca.Selection(se_cin=se_cin, kinds=[CertType.AUTH]))


@s02_release_auth.done
def _(data: FoundData, reply: ca.ReleaseDone) -> None:
    data.released = sorted(c.serial for c in reply.changes if c.status is Status.VALID)


@found.command(reply=ca.RevokeDone, timeout=CA_TIMEOUT, retry=CA_RETRY)
def s03_revoke_sign(data: FoundData, ctx: StepContext) -> ca.Revoke:
    """3. The signing certificate cannot come back (a signature made meanwhile would be
    undeniable): revoke it, superseded by the one issued next."""
    return ca.Revoke(command_id=key(ctx), cause=Cause.REISSUE,
                     selection=ca.Selection(se_cin=data.report.phone.se.cin, kinds=[CertType.SIGN]))


@s03_revoke_sign.done
def _(data: FoundData, reply: ca.RevokeDone) -> None:
    data.revoked = sorted(c.serial for c in reply.changes)
    data.reissue = any(c.kind is CertType.SIGN for c in reply.changes)


def _reissuing(data: FoundData) -> bool:
    return data.reissue


@found.event(ReissueAccepted, timeout=USER_TIMEOUT, when=_reissuing)
def s04_prompt(data: FoundData) -> ReissuePrompt:
    """4. The app asks the user to renew the signing certificate now."""
    return ReissuePrompt(certificates=SIGN, pin_option=data.report.pin_option)


@s04_prompt.done
def _(data: FoundData, accepted: ReissueAccepted) -> None:
    data.app_instance_id = accepted.app_instance_id


@found.local(when=_reissuing)
def s05_application(data: FoundData, ctx: StepContext) -> None:
    """5. The application the card signs (issuance step 5)."""
    data.nonce = ctx.rng.randbytes(32)
    data.requested_at = datetime.fromtimestamp(ctx.now, UTC)


def _application(data: FoundData) -> Application:
    if data.nonce is None or data.requested_at is None or data.app_instance_id is None:
        raise Refused("application not prepared")
    phone = data.report.phone
    return Application(
        application_id=data.report.request_id, nonce=data.nonce, device_id=phone.device_id,
        app_instance_id=data.app_instance_id, se=phone.se, certificates=SIGN,
        requested_at=data.requested_at, pin_option=data.report.pin_option,
    )


@found.event(CardSignature, timeout=USER_TIMEOUT, when=_reissuing)
def s06_card_signature(data: FoundData) -> CardSignatureRequest:
    """6. The user's card signs the application."""
    return CardSignatureRequest(application=_application(data))


@s06_card_signature.done
def _(data: FoundData, answer: CardSignature) -> None:
    keep_card_signature(data, _application(data), answer)


@found.command(reply=ca.ApplicationVerified, timeout=CA_TIMEOUT, retry=CA_RETRY, when=_reissuing)
def s07_verify(data: FoundData, ctx: StepContext) -> ca.VerifyApplication:
    """7. The CA verifies the card signature (issuance step 6)."""
    return verify_application(data, key(ctx), _se(data))


@s07_verify.done
def _(data: FoundData, reply: ca.ApplicationVerified) -> None:
    keep_verified(data, reply)


@found.command(reply=tsm.GenerateKeysReply, timeout=SE_TIMEOUT, retry=SE_RETRY, when=_reissuing)
def s08_generate_sign_key(data: FoundData, ctx: StepContext) -> tsm.GenerateKeys:
    """8. A new signing key pair in the applet (the authentication key stays). No undo: a
    wipe would take the released authentication key too; a signing key without a live
    certificate is unusable and goes with the applet's next clean-up."""
    phone = data.report.phone
    return tsm.GenerateKeys(command_id=key(ctx), device_id=phone.device_id, se=phone.se,
                            certificates=SIGN, owner_reference=data.person_id or "")


@s08_generate_sign_key.done
def _(data: FoundData, reply: tsm.GenerateKeysReply) -> None:
    data.public_keys = list(reply.public_keys)


@found.command(reply=ca.CertificatesIssued, timeout=CA_TIMEOUT, retry=CA_RETRY, when=_reissuing)
def s09_issue_sign(data: FoundData, ctx: StepContext) -> ca.IssueCertificates:
    """9. The new signing certificate (issuance step 9)."""
    return ca.IssueCertificates(command_id=key(ctx), public_keys=[
        ca.PublicKeyProof(kind=CertType(k.kind.value), public_key_der=k.public_key_der,
                          challenge=k.challenge, proof=k.proof)
        for k in data.public_keys
    ])


@s09_issue_sign.done
def _(data: FoundData, reply: ca.CertificatesIssued) -> None:
    data.issued = list(reply.certificates)


@s09_issue_sign.undo(timeout=CA_TIMEOUT)
def _(data: FoundData, ctx: StepContext) -> ca.Revoke:
    # The signing certificate issued by step 9 is the only live signing one on this SE.
    return ca.Revoke(command_id=key(ctx, undo=True), cause=Cause.COMPENSATION,
                     selection=ca.Selection(se_cin=data.report.phone.se.cin,
                                            kinds=[CertType.SIGN]))


@found.command(reply=tsm.StoreCertificatesReply, timeout=SE_TIMEOUT, retry=SE_RETRY,
               when=_reissuing)
def s10_store(data: FoundData, ctx: StepContext) -> tsm.StoreCertificates:
    """10. Certificate into the applet, a temporary signing password (issuance step 10)."""
    phone = data.report.phone
    return tsm.StoreCertificates(
        command_id=key(ctx), device_id=phone.device_id, se=phone.se,
        certificates=[tsm.CertificateToStore(kind=CertificateKind(c.kind.value),
                                             certificate=c.certificate,
                                             ca_certificate=c.ca_certificate)
                      for c in data.issued],
        pin_option=data.report.pin_option,
    )


@found.command(reply=tsm.ReleasePinsReply, timeout=SE_TIMEOUT, retry=SE_RETRY, when=_reissuing)
def s11_release(data: FoundData, ctx: StepContext) -> tsm.ReleasePins:
    """11. Release just before the user sets the password (issuance step 11)."""
    phone = data.report.phone
    return tsm.ReleasePins(command_id=key(ctx), device_id=phone.device_id, se=phone.se,
                           certificates=SIGN, pin_option=data.report.pin_option)


@found.event(PinsSet, timeout=USER_TIMEOUT, when=_reissuing)
def s12_local_pin_setting(data: FoundData) -> PinSettingGoAhead:
    """12. The user sets the new signing password locally (issuance step 12)."""
    return PinSettingGoAhead(certificates=SIGN, pin_option=data.report.pin_option)


@on_end(FLOW_NAME)
def ending(data: FoundData, status: str, reason: str | None) -> Result | None:
    if not data.reissue:
        return None  # nothing asked of the phone
    if status == COMPLETED:
        return Result(outcome=Outcome.ISSUED, phase=4,
                      certificates=sorted(({CertificateKind.AUTH} if data.released else set())
                                          | set(SIGN)))
    text = reason or ""
    if text.startswith("aborted by"):
        return Result(outcome=Outcome.CANCELLED, phase=4, reason=Reason.USER_CANCELLED)
    if text.startswith("s07_verify"):
        return Result(outcome=Outcome.REFUSED, phase=4, reason=Reason.BAD_CARD_SIGNATURE)
    return Result(outcome=Outcome.FAILED, phase=4, reason=Reason.INTERNAL)
