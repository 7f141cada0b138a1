"""Disposal (FLOWS.md §4): in the app, confirmed with the phone's signing password; revoke
both certificates and delete the applet. (A factory reset alone does not wipe the SE: that
is why disposal is a flow.)

The confirmation is a signature by the phone's own key over a challenge with a fresh nonce,
made after the user typed the phone's signing password (the authentication PIN and key
when the phone holds only the authentication certificate). The CA says which certificates
are live on the SE; the confirmation counts only if it comes from one of them.
"""

from __future__ import annotations

import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from orchestrator.flows.ending import on_end
from orchestrator.flows.lifecycle_common import (
    CA_RETRY,
    CA_TIMEOUT,
    SE_RETRY,
    SE_TIMEOUT,
    USER_TIMEOUT,
    Refused,
    key,
    result,
)
from orchestrator.lifecycle_messages import (
    DisposalChallenge,
    DisposalConfirmed,
    DisposalRequest,
    LifecycleFlow,
    LifecycleReason,
    LifecycleResult,
)
from orchestrator.messages import SeIdentity
from orchestrator.saga import Flow, StepContext
from protocol.envelope import Message
from workers.ca import messages as ca
from workers.ca.revocation import Cause
from workers.tsm import messages as tsm

FLOW_NAME = "lifecycle.disposal"


class DisposalData(msgspec.Struct, kw_only=True):
    device_id: str
    app_instance_id: str
    se: SeIdentity
    nonce: bytes | None = None
    confirmation: DisposalConfirmed | None = None
    live: list[ca.LiveCertificate] = []
    refusal: LifecycleReason | None = None
    revoked: list[str] = []
    deleted: bool = False


def from_request(message: Message) -> DisposalData:
    request: DisposalRequest = message.body
    return DisposalData(device_id=request.device_id, app_instance_id=request.app_instance_id,
                        se=request.se)


disposal: Flow[DisposalData] = Flow(
    FLOW_NAME, DisposalData, deadline=20 * 60, device=lambda d: d.device_id,
    start_on=DisposalRequest, initial=from_request,
)


def challenge_of(data: DisposalData) -> DisposalChallenge:
    if data.nonce is None:
        raise Refused("no challenge yet")
    return DisposalChallenge(device_id=data.device_id, se=data.se, nonce=data.nonce)


@disposal.local
def s01_challenge(data: DisposalData, ctx: StepContext) -> None:
    """1. A fresh nonce: the confirmation cannot be replayed."""
    data.nonce = ctx.rng.randbytes(32)


@disposal.event(DisposalConfirmed, timeout=USER_TIMEOUT)
def s02_confirmation(data: DisposalData) -> DisposalChallenge:
    """2. The user types the phone's signing password; the phone key signs the challenge."""
    return challenge_of(data)


@s02_confirmation.done
def _(data: DisposalData, confirmed: DisposalConfirmed) -> None:
    data.confirmation = confirmed


@disposal.command(reply=ca.SeCertificates, timeout=CA_TIMEOUT, retry=CA_RETRY)
def s03_live_certificates(data: DisposalData, ctx: StepContext) -> ca.SeCertificatesQuery:
    """3. The CA says what is live on this SE."""
    return ca.SeCertificatesQuery(command_id=key(ctx), se_cin=data.se.cin)


@s03_live_certificates.done
def _(data: DisposalData, reply: ca.SeCertificates) -> None:
    data.live = list(reply.certificates)


@disposal.local
def s04_check_confirmation(data: DisposalData) -> None:
    """4. The signature verifies with a live certificate of this SE (PKCS#1 v1.5, SHA-256)."""
    confirmation = data.confirmation
    if confirmation is None or not confirmation_verifies(data, confirmation):
        data.refusal = LifecycleReason.BAD_CONFIRMATION
        raise Refused("the disposal confirmation does not verify")


def confirmation_verifies(data: DisposalData, confirmation: DisposalConfirmed) -> bool:
    if not any(c.certificate == confirmation.certificate and c.kind.value == confirmation.kind
               for c in data.live):
        return False
    public_key = x509.load_der_x509_certificate(confirmation.certificate).public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        return False
    try:
        public_key.verify(confirmation.signature, challenge_of(data).to_be_signed(),
                          padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


@disposal.command(reply=ca.RevokeDone, timeout=CA_TIMEOUT, retry=CA_RETRY)
def s05_revoke(data: DisposalData, ctx: StepContext) -> ca.Revoke:
    """5. Revoke both (cessationOfOperation)."""
    return ca.Revoke(command_id=key(ctx), cause=Cause.DISPOSAL,
                     selection=ca.Selection(se_cin=data.se.cin))


@s05_revoke.done
def _(data: DisposalData, reply: ca.RevokeDone) -> None:
    data.revoked = sorted(c.serial for c in reply.changes)


@disposal.command(reply=tsm.WipeAppletReply, timeout=SE_TIMEOUT, retry=SE_RETRY)
def s06_delete_applet(data: DisposalData, ctx: StepContext) -> tsm.WipeApplet:
    """6. Delete the applet, its keys with it (GP DELETE over SCP03)."""
    return tsm.WipeApplet(command_id=key(ctx), device_id=data.device_id, se=data.se,
                          delete_applet=True)


@s06_delete_applet.done
def _(data: DisposalData, reply: tsm.WipeAppletReply) -> None:
    data.deleted = reply.deleted


@on_end(FLOW_NAME)
def ending(data: DisposalData, status: str, reason: str | None) -> LifecycleResult:
    return result(LifecycleFlow.DISPOSAL, status, reason, data.refusal,
                  applet_deleted=data.deleted)
