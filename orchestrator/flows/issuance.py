"""New issuance, phases 1 → 4, one or both certificates (FLOWS.md §1, the seed §2–§4).

Each step is numbered as in FLOWS.md; its compensation is registered right under it.
The saga id is the app's ``application_id``; the TSM's and the CA's idempotency key of a
step is ``<saga id>:<step>`` (``:undo`` for its compensation), so a re-sent command is
answered, not run twice.

How it ends (``ending``): the phone gets ``app.cmd.result`` in the same transaction as the
saga's final state — ``issued`` in phase 4, or ``refused`` / ``failed`` / ``cancelled``
with a reason code once every compensation (revoke, wipe, delete) is done.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec

from orchestrator.flows.card_application import (
    keep_card_signature,
    keep_verified,
    verify_application,
)
from orchestrator.flows.ending import on_end
from orchestrator.messages import (
    DEFAULT_PIN_OPTION,
    Aborted,
    Application,
    CardSignature,
    CardSignatureRequest,
    CertificateKind,
    Enrolment,
    Outcome,
    PinOption,
    PinSettingGoAhead,
    PinsSet,
    Reason,
    Result,
    SeIdentity,
)
from orchestrator.saga import Flow, Retry, StepContext
from orchestrator.saga.machine import COMPLETED
from protocol.envelope import Message
from protocol.errors import JpkiError
from workers.ca import application as ca_app
from workers.ca import messages as ca
from workers.ca.profiles import CertType
from workers.ca.revocation import Cause
from workers.ca.state_check import Branch
from workers.tsm import messages as tsm

FLOW_NAME = "issuance.new"

# The whole saga, card session included: the CA accepts a signed application for
# 15 minutes (workers/ca/authority.APPLICATION_FRESHNESS); past that nothing can be issued.
DEADLINE_SECONDS = 20 * 60
# One SCP03 script is one round trip to the phone (FLOWS.md "throughput shape").
SE_TIMEOUT = 15.0
SE_RETRY = Retry(max_attempts=3, initial=0.5)
CA_TIMEOUT = 10.0
CA_RETRY = Retry(max_attempts=4, initial=0.2)
# The user reads, types the card's password and taps the card / types new PINs.
USER_TIMEOUT = 10 * 60.0


# ---------------------------------------------------------------------------------------
# Eligibility (phase 1): a pure policy, configurable.


@dataclass(frozen=True, slots=True)
class EligibilityPolicy:
    """Which phones may carry the JPKI applet (J-LIS publishes an allow-list of models)."""

    min_os_version: dict[str, int]  # lower-case OS name → lowest major version
    model_pattern: re.Pattern[str]  # models whose SE the JPKI applet is certified for

    def refusal(self, enrolment: Enrolment) -> Reason | None:
        if not enrolment.se_present or enrolment.se is None:
            return Reason.NO_SECURE_ELEMENT
        minimum = self.min_os_version.get(enrolment.os_name.lower())
        if minimum is None or _major(enrolment.os_version) < minimum:
            return Reason.UNSUPPORTED_OS
        if not self.model_pattern.fullmatch(enrolment.model):
            return Reason.UNSUPPORTED_MODEL
        return None


def _major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else -1


# Android since 2023 (Android 9+ with a GP SE), iPhone since 2025 (DOMAIN.md §3).
DEFAULT_POLICY = EligibilityPolicy(
    min_os_version={"android": 9, "ios": 18},
    model_pattern=re.compile(
        r"(Pixel|Galaxy|Xperia|AQUOS|arrows|iPhone|Sim(ulated)? ?Phone|SE Phone)\b.*"
    ),
)
policy = DEFAULT_POLICY


class NotEligible(JpkiError):
    """Phase 1 refused the phone; the saga data holds the reason code."""


class RenewCardFirst(JpkiError):
    """FLOWS.md §3: the card's certificate is revoked or expired; nothing can be issued."""


# ---------------------------------------------------------------------------------------
# The saga's data (stored as JSON with the saga; nothing secret in it).


class IssuedCert(msgspec.Struct, kw_only=True):
    kind: CertificateKind
    serial: str
    certificate: bytes
    ca_certificate: bytes


class IssuanceData(msgspec.Struct, kw_only=True):
    application_id: str
    device_id: str
    app_instance_id: str
    model: str
    os_name: str
    os_version: str
    se_present: bool
    se: SeIdentity | None
    certificates: list[CertificateKind]
    pin_option: PinOption = DEFAULT_PIN_OPTION
    refusal: Reason | None = None  # set by a step that refuses, for the ending
    # steps 2–4 (one script): the owner reference of keys deleted with the applet ("" for
    # keys without one); None when the SE held no keys
    cleaned_owner: str | None = None
    # step 5
    nonce: bytes | None = None
    requested_at: datetime | None = None
    to_be_signed: bytes | None = None
    card_signature: bytes | None = None
    card_certificate: bytes | None = None
    # step 6
    person_id: str | None = None
    # step 7
    branch: str | None = None
    revoke_now: list[str] = []
    release: list[str] = []
    revoke_after_success: list[str] = []
    old_se: list[str] = []  # SEs whose applet is deleted when the phone is next online
    # step 8
    public_keys: list[tsm.PublicKey] = []
    # step 9
    issued: list[IssuedCert] = []
    # step 13
    retired: list[str] = []  # serials of the previous phone revoked on activation


def from_enrolment(message: Message) -> IssuanceData:
    e: Enrolment = message.body
    return IssuanceData(
        application_id=e.application_id,
        device_id=e.device_id,
        app_instance_id=e.app_instance_id,
        model=e.model,
        os_name=e.os_name,
        os_version=e.os_version,
        se_present=e.se_present,
        se=e.se,
        certificates=sorted(set(e.certificates)),
        pin_option=e.pin_option,
    )


issuance: Flow[IssuanceData] = Flow(
    FLOW_NAME,
    IssuanceData,
    deadline=DEADLINE_SECONDS,
    device=lambda d: d.device_id,
    start_on=Enrolment,
    initial=from_enrolment,
    abort_on=(Aborted,),
)


def _key(ctx: StepContext, undo: bool = False) -> str:
    return f"{ctx.saga_id}:{ctx.step}" + (":undo" if undo else "")


def _se(data: IssuanceData) -> SeIdentity:
    if data.se is None:  # eligibility refused such a phone before any SE step
        raise NotEligible("no secure element")
    return data.se


# ---------------------------------------------------------------------------------------
# Phase 1


@issuance.local
def s01_eligibility(data: IssuanceData) -> None:
    """1. The app reported model, OS, SE and SE identity: is this phone supported?"""
    enrolment = Enrolment(
        application_id=data.application_id, device_id=data.device_id,
        app_instance_id=data.app_instance_id, model=data.model, os_name=data.os_name,
        os_version=data.os_version, se_present=data.se_present, se=data.se,
        certificates=data.certificates, pin_option=data.pin_option,
    )
    refusal = policy.refusal(enrolment)
    if refusal is not None:
        data.refusal = refusal
        raise NotEligible(refusal.value)


# ---------------------------------------------------------------------------------------
# Phase 2: applet preparation


@issuance.command(reply=tsm.PrepareSeReply, timeout=SE_TIMEOUT, retry=SE_RETRY)
def s02_prepare_se(data: IssuanceData, ctx: StepContext) -> tsm.PrepareSe:
    """2–4, one SCP03 script (FLOWS.md "throughput shape"). 2: GET STATUS — is there a JPKI
    applet, does it hold keys, whose? 3: never reuse an applet: the user's own keys
    (factory reset, app reinstalled) or someone else's (second-hand phone) go with it (seed
    §2.(2) supplement). 4: install the JPKI applet and make it selectable: phase 2 done."""
    return tsm.PrepareSe(command_id=_key(ctx), device_id=data.device_id, se=_se(data))


@s02_prepare_se.done
def _(data: IssuanceData, reply: tsm.PrepareSeReply) -> None:
    if reply.held_keys:  # whose: decided after step 6, when the applicant is proven
        data.cleaned_owner = reply.owner_reference or ""


@s02_prepare_se.undo(timeout=SE_TIMEOUT)
def _(data: IssuanceData, ctx: StepContext) -> tsm.WipeApplet:
    return tsm.WipeApplet(
        command_id=_key(ctx, undo=True), device_id=data.device_id, se=_se(data),
        delete_applet=True,
    )


# ---------------------------------------------------------------------------------------
# Phase 3: initial setup


@issuance.local
def s05_application(data: IssuanceData, ctx: StepContext) -> None:
    """5. The application the card will sign: a fresh nonce from the injected randomness."""
    data.nonce = ctx.rng.randbytes(32)
    data.requested_at = datetime.fromtimestamp(ctx.now, UTC)


def _application(data: IssuanceData) -> Application:
    if data.nonce is None or data.requested_at is None:
        raise NotEligible("application not prepared")
    return Application(
        application_id=data.application_id, nonce=data.nonce, device_id=data.device_id,
        app_instance_id=data.app_instance_id, se=_se(data), certificates=data.certificates,
        requested_at=data.requested_at, pin_option=data.pin_option,
    )


@issuance.event(CardSignature, timeout=USER_TIMEOUT)
def s05_card_signature(data: IssuanceData) -> CardSignatureRequest:
    """5. The user types the card's signing password and taps the card; the card signs the
    application. The typing stays on the phone; the signature travels."""
    return CardSignatureRequest(application=_application(data))


@s05_card_signature.done
def _(data: IssuanceData, answer: CardSignature) -> None:
    keep_card_signature(data, _application(data), answer)


@issuance.command(reply=ca.ApplicationVerified, timeout=CA_TIMEOUT, retry=CA_RETRY)
def s06_verify(data: IssuanceData, ctx: StepContext) -> ca.VerifyApplication:
    """6. Card signature, card certificate chain, validity, revocation, nonce, SE."""
    se = _se(data)
    return verify_application(data, _key(ctx), ca_app.SeIdentity(cin=se.cin, kdd=se.kdd))


@s06_verify.done
def _(data: IssuanceData, reply: ca.ApplicationVerified) -> None:
    keep_verified(data, reply)


@issuance.command(reply=ca.StateCheckResult, timeout=CA_TIMEOUT, retry=CA_RETRY)
def s07_state_check(data: IssuanceData, ctx: StepContext) -> ca.StateCheckRequest:
    """7. Supplement ①: the person's existing phone certificates decide the branch (§3)."""
    return ca.StateCheckRequest(command_id=_key(ctx))


@s07_state_check.done
def _(data: IssuanceData, reply: ca.StateCheckResult) -> None:
    data.branch = reply.branch.value if reply.branch is not None else None
    data.revoke_now = list(reply.revoke_now)
    data.release = list(reply.release)
    data.revoke_after_success = list(reply.revoke_after_success)
    data.old_se = list(reply.old_se)


@issuance.local
def s07_branch(data: IssuanceData) -> None:
    """7. §3 "card certificate revoked or expired": refuse, the card must be renewed."""
    if data.branch == Branch.RENEW_CARD_FIRST:
        data.refusal = Reason.CARD_CERTIFICATE_REVOKED
        raise RenewCardFirst("renew the card first")


@issuance.command(
    reply=ca.RevokeDone, timeout=CA_TIMEOUT, retry=CA_RETRY,
    when=lambda d: bool(d.revoke_now or d.release),
)
def s07_revoke_own_on_this_se(data: IssuanceData, ctx: StepContext) -> ca.Revoke:
    """7. This person's certificates on this SE lost their keys in step 3 (app reinstalled,
    or a found phone whose applet was cleaned): §3 says revoke them and issue anew."""
    return ca.Revoke(
        command_id=_key(ctx), cause=Cause.REISSUE,
        selection=ca.Selection(serials=sorted(set(data.revoke_now) | set(data.release))),
    )


@issuance.command(
    reply=ca.RevokeDone, timeout=CA_TIMEOUT, retry=CA_RETRY,
    when=lambda d: d.cleaned_owner is not None and d.cleaned_owner != d.person_id,
)
def s07_revoke_foreign_on_this_se(data: IssuanceData, ctx: StepContext) -> ca.Revoke:
    """3 (told to the CA once the card has proved who is applying). The applet deleted in
    step 3 held someone else's keys (a second-hand phone): whatever is still live on this
    SE is theirs and keyless now. Waiting for step 6 means an unproven enrolment can never
    make the CA revoke anything."""
    return ca.Revoke(
        command_id=_key(ctx), cause=Cause.FOREIGN_APPLET,
        selection=ca.Selection(se_cin=_se(data).cin),
    )


@issuance.command(reply=tsm.GenerateKeysReply, timeout=SE_TIMEOUT, retry=SE_RETRY)
def s08_generate_keys(data: IssuanceData, ctx: StepContext) -> tsm.GenerateKeys:
    """8. One or two RSA-2048 pairs in the applet; public keys with proof of possession."""
    return tsm.GenerateKeys(
        command_id=_key(ctx), device_id=data.device_id, se=_se(data),
        certificates=data.certificates, owner_reference=data.person_id or "",
    )


@s08_generate_keys.done
def _(data: IssuanceData, reply: tsm.GenerateKeysReply) -> None:
    data.public_keys = list(reply.public_keys)


@s08_generate_keys.undo(timeout=SE_TIMEOUT)
def _(data: IssuanceData, ctx: StepContext) -> tsm.WipeApplet:
    return tsm.WipeApplet(
        command_id=_key(ctx, undo=True), device_id=data.device_id, se=_se(data),
        delete_applet=False,
    )


@issuance.command(reply=ca.CertificatesIssued, timeout=CA_TIMEOUT, retry=CA_RETRY)
def s09_issue(data: IssuanceData, ctx: StepContext) -> ca.IssueCertificates:
    """9. The certificate(s), profile per DOMAIN.md §2, expiring with the card's."""
    return ca.IssueCertificates(
        command_id=_key(ctx),
        public_keys=[
            ca.PublicKeyProof(kind=CertType(k.kind.value), public_key_der=k.public_key_der,
                              challenge=k.challenge, proof=k.proof)
            for k in data.public_keys
        ],
    )


@s09_issue.done
def _(data: IssuanceData, reply: ca.CertificatesIssued) -> None:
    data.issued = [
        IssuedCert(kind=CertificateKind(c.kind), serial=c.serial, certificate=c.certificate,
                   ca_certificate=c.ca_certificate)
        for c in reply.certificates
    ]


@s09_issue.undo(timeout=CA_TIMEOUT)
def _(data: IssuanceData, ctx: StepContext) -> ca.Revoke:
    # By SE, not by the serials we know: a reply lost after the CA issued leaves ``issued``
    # empty here. Step 7 revoked everything else live on this SE, so only ours remain.
    return ca.Revoke(
        command_id=_key(ctx, undo=True), cause=Cause.COMPENSATION,
        selection=ca.Selection(se_cin=_se(data).cin,
                               kinds=[CertType(k.value) for k in data.certificates]),
    )


@issuance.command(reply=tsm.StoreCertificatesReply, timeout=SE_TIMEOUT, retry=SE_RETRY)
def s10_store(data: IssuanceData, ctx: StepContext) -> tsm.StoreCertificates:
    """10. Certificates and CA certificates into the applet, temporary PIN(s) chosen by the
    TSM; option 3: PIN blocked, option 4: PIN in its initial state. One SCP03 script."""
    return tsm.StoreCertificates(
        command_id=_key(ctx), device_id=data.device_id, se=_se(data),
        certificates=[
            tsm.CertificateToStore(kind=c.kind, certificate=c.certificate,
                                   ca_certificate=c.ca_certificate)
            for c in data.issued
        ],
        pin_option=data.pin_option,
    )


@issuance.command(reply=tsm.ReleasePinsReply, timeout=SE_TIMEOUT, retry=SE_RETRY)
def s11_release(data: IssuanceData, ctx: StepContext) -> tsm.ReleasePins:
    """11. Just before the user sets the PIN: option 3 lifts the block, option 4 moves the
    PIN out of its initial state; the TSM hands the temporary PIN(s) to the app only."""
    return tsm.ReleasePins(
        command_id=_key(ctx), device_id=data.device_id, se=_se(data),
        certificates=data.certificates, pin_option=data.pin_option,
    )


@issuance.event(PinsSet, timeout=USER_TIMEOUT)
def s12_local_pin_setting(data: IssuanceData) -> PinSettingGoAhead:
    """12. The user types the new PIN(s); the app VERIFYs the temporary PIN and CHANGEs it
    on the SE, then reports success without the PIN (seed §3, same card session)."""
    return PinSettingGoAhead(certificates=data.certificates, pin_option=data.pin_option)


@s12_local_pin_setting.done
def _(data: IssuanceData, report: PinsSet) -> None:
    if set(report.certificates) != set(data.certificates):
        data.refusal = Reason.PIN_SETTING_FAILED


@issuance.local
def s12_all_pins_set(data: IssuanceData) -> None:
    if data.refusal is Reason.PIN_SETTING_FAILED:
        raise NotEligible("not every PIN was set")


@issuance.command(
    reply=ca.RevokeDone, timeout=CA_TIMEOUT, retry=CA_RETRY,
    when=lambda d: bool(d.revoke_after_success),
)
def s13_activate_retire_old_phone(data: IssuanceData, ctx: StepContext) -> ca.Revoke:
    """13. Phase 4. Model change: one phone per person, so the old phone's certificates are
    revoked now; its applet is deleted when it is next online (``old_se`` records which)."""
    return ca.Revoke(
        command_id=_key(ctx), cause=Cause.MODEL_CHANGE,
        selection=ca.Selection(serials=data.revoke_after_success),
    )


@s13_activate_retire_old_phone.done
def _(data: IssuanceData, reply: ca.RevokeDone) -> None:
    data.retired = sorted(set(data.revoke_after_success))


# ---------------------------------------------------------------------------------------
# How it ends, as the phone shows it


_STEP_REASONS: dict[str, Reason] = {
    "s02_prepare_se": Reason.SE_ERROR,
    "s05_card_signature": Reason.TIMEOUT,
    "s06_verify": Reason.BAD_CARD_SIGNATURE,
    "s08_generate_keys": Reason.SE_ERROR,
    "s09_issue": Reason.ISSUANCE_REFUSED,
    "s10_store": Reason.SE_ERROR,
    "s11_release": Reason.SE_ERROR,
    "s12_local_pin_setting": Reason.TIMEOUT,
}
# The CA's refusal codes (workers/ca/errors.CaErrorCode) as the app's reason codes.
_VERIFY_REASONS: dict[str, Reason] = {
    "forged_signature": Reason.BAD_CARD_SIGNATURE,
    "malformed_application": Reason.BAD_APPLICATION,
    "wrong_secure_element": Reason.BAD_APPLICATION,
    "nonce_unknown": Reason.BAD_APPLICATION,
    "nonce_expired": Reason.TIMEOUT,
    "nonce_replayed": Reason.BAD_APPLICATION,
    "unknown_card_certificate": Reason.CARD_CERTIFICATE_INVALID,
    "untrusted_card_certificate": Reason.CARD_CERTIFICATE_INVALID,
    "card_certificate_expired": Reason.CARD_CERTIFICATE_EXPIRED,
    "card_certificate_revoked": Reason.CARD_CERTIFICATE_REVOKED,
}
_REFUSING_STEPS = frozenset({"s01_eligibility", "s06_verify", "s07_branch"})
_STEP_IN_REASON = re.compile(r"^(?:undo of )?(s\d\d_[a-z0-9_]+) ")


def reason_of(data: IssuanceData, engine_reason: str | None) -> tuple[Outcome, Reason]:
    """Outcome and reason code of a saga that did not complete (never free text)."""
    text = engine_reason or ""
    if text.startswith("aborted by"):
        return Outcome.CANCELLED, Reason.USER_CANCELLED
    match = _STEP_IN_REASON.match(text)
    step = match.group(1) if match else None
    if data.refusal is not None:
        return (Outcome.REFUSED if step in _REFUSING_STEPS else Outcome.FAILED), data.refusal
    if step == "s06_verify":
        code = text.rsplit(": ", 1)[-1]
        return Outcome.REFUSED, _VERIFY_REASONS.get(code, Reason.BAD_CARD_SIGNATURE)
    if "deadline" in text or "timeout" in text:
        return Outcome.FAILED, Reason.TIMEOUT
    return Outcome.FAILED, _STEP_REASONS.get(step or "", Reason.INTERNAL)


@on_end(FLOW_NAME)
def ending(data: IssuanceData, status: str, reason: str | None) -> Result:
    if status == COMPLETED:
        return Result(
            outcome=Outcome.ISSUED, phase=4, certificates=[c.kind for c in data.issued],
            model_change=bool(data.retired),
        )
    outcome, code = reason_of(data, reason)
    return Result(outcome=outcome, phase=1, reason=code)
