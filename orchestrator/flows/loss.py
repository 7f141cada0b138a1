"""Loss and failure (FLOWS.md §4), reported through the call centre (authenticated):
revoke both certificates of the phone. The applet is deleted when the phone next connects
(``online.py``); a broken phone that is repaired is cleaned the same way, or in phase 2 of
an issuance on it.
"""

from __future__ import annotations

from typing import Any

import msgspec

from orchestrator import callcentre
from orchestrator.flows.lifecycle_common import CA_RETRY, CA_TIMEOUT, key
from orchestrator.lifecycle_messages import FailureReport, LossReport
from orchestrator.saga import Flow, StepContext
from workers.ca import messages as ca
from workers.ca.revocation import Cause

LOSS = "lifecycle.loss"
FAILURE = "lifecycle.failure"


class LossData(msgspec.Struct, kw_only=True):
    report: LossReport
    revoked: list[str] = []


class FailureData(msgspec.Struct, kw_only=True):
    report: FailureReport
    revoked: list[str] = []


def _revocation_flow(
    name: str, data_type: type[Any], report_type: type[Any], cause: Cause
) -> Flow[Any]:
    flow: Flow[Any] = Flow(
        name, data_type, deadline=10 * 60, start_on=report_type,
        initial=lambda message: data_type(report=message.body),
    )

    @flow.local
    def s01_authenticate(data: Any, ctx: StepContext) -> None:
        """1. A known operator signed this request, lately (callcentre.py)."""
        callcentre.authenticate(data.report, ctx.now)

    @flow.command(reply=ca.RevokeDone, timeout=CA_TIMEOUT, retry=CA_RETRY)
    def s02_revoke_both(data: Any, ctx: StepContext) -> ca.Revoke:
        """2. Revoke every live certificate on the phone's SE."""
        return ca.Revoke(command_id=key(ctx), cause=cause,
                         selection=ca.Selection(se_cin=data.report.phone.se.cin))

    @s02_revoke_both.done
    def _(data: Any, reply: ca.RevokeDone) -> None:
        data.revoked = sorted(c.serial for c in reply.changes if c.changed)

    return flow



loss = _revocation_flow(LOSS, LossData, LossReport, Cause.LOSS)
failure = _revocation_flow(FAILURE, FailureData, FailureReport, Cause.FAILURE)
