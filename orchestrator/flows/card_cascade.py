"""Card-certificate cascade (FLOWS.md §4), from the call centre (the municipality's report
reaches us as an operator request): the card's signing certificate is revoked (move,
marriage) → the phone signing certificates issued under it are revoked; the card is
renewed → both phone certificates are revoked. The CA does the cascade in one transaction
(``ca.cmd.card_cascade``); a phone left without a live certificate cleans its applet when it
next connects (``online.py``).
"""

from __future__ import annotations

import msgspec

from orchestrator import callcentre
from orchestrator.flows.lifecycle_common import CA_RETRY, CA_TIMEOUT, key
from orchestrator.lifecycle_messages import CardCascadeReport
from orchestrator.saga import Flow, StepContext
from workers.ca import messages as ca
from workers.ca.revocation import Cause

FLOW_NAME = "lifecycle.card_cascade"


class CardCascadeData(msgspec.Struct, kw_only=True):
    report: CardCascadeReport
    changes: list[ca.StatusChange] = []


card_cascade: Flow[CardCascadeData] = Flow(
    FLOW_NAME, CardCascadeData, deadline=10 * 60, start_on=CardCascadeReport,
    initial=lambda message: CardCascadeData(report=message.body),
)


@card_cascade.local
def s01_authenticate(data: CardCascadeData, ctx: StepContext) -> None:
    """1. A known operator signed this report, lately."""
    callcentre.authenticate(data.report, ctx.now)


@card_cascade.command(reply=ca.CardCascadeDone, timeout=CA_TIMEOUT, retry=CA_RETRY)
def s02_revoke_card_and_cascade(
    data: CardCascadeData, ctx: StepContext
) -> ca.CardCertificateRevoked:
    """2. Revoke the card certificate; the CA revokes the phone certificates that follow it."""
    cause = Cause.CARD_RENEWED if data.report.renewed else Cause.CARD_FACTS_CHANGED
    return ca.CardCertificateRevoked(command_id=key(ctx), card_serial=data.report.card_serial,
                                     cause=cause)


@s02_revoke_card_and_cascade.done
def _(data: CardCascadeData, reply: ca.CardCascadeDone) -> None:
    data.changes = list(reply.changes)
