"""Temporary loss and "not found within a set period" (FLOWS.md §4), from the call centre.

1. Authenticate the request.
2. Suspend both certificates (certificateHold). Its undo revokes them (keyCompromise):
   a hold that is not lifted by a "found" in time becomes a revocation.
3. Wait for the phone to be found: a durable timer of ``NOT_FOUND_PERIOD_S`` (a row in
   ``saga_timers``: it survives restarts). A ``FoundReport`` naming this saga ends the wait
   (the found flow, ``found.py``, then releases / revokes / reissues); the timer firing
   compensates step 2, i.e. revokes. That saga ends ``compensated`` with the reason
   ``s03_until_found ... timeout``: "not found, revoked".
4. The found report is authenticated too; a forged one revokes (undo of step 2), never
   releases.
"""

from __future__ import annotations

import os

import msgspec

from orchestrator import callcentre
from orchestrator.flows.lifecycle_common import CA_RETRY, CA_TIMEOUT, key
from orchestrator.lifecycle_messages import FoundReport, TemporaryLossReport
from orchestrator.saga import Flow, Retry, StepContext
from workers.ca import messages as ca
from workers.ca.revocation import Cause

FLOW_NAME = "lifecycle.temporary_loss"
# The set period; a deployment's choice (J-LIS's rule of thumb: a month).
NOT_FOUND_PERIOD_S = float(os.environ.get("JPKI_NOT_FOUND_PERIOD_S", str(30 * 86400)))


class TemporaryLossData(msgspec.Struct, kw_only=True):
    report: TemporaryLossReport
    held: list[str] = []
    found: FoundReport | None = None


def temporary_loss_flow(not_found_period_s: float = NOT_FOUND_PERIOD_S) -> Flow[TemporaryLossData]:
    """The flow with its period (tests and small deployments choose theirs)."""
    flow: Flow[TemporaryLossData] = Flow(
        FLOW_NAME, TemporaryLossData, deadline=not_found_period_s + 3600,
        start_on=TemporaryLossReport,
        initial=lambda message: TemporaryLossData(report=message.body),
    )

    @flow.local
    def s01_authenticate(data: TemporaryLossData, ctx: StepContext) -> None:
        """1. A known operator signed this request, lately."""
        callcentre.authenticate(data.report, ctx.now)

    @flow.command(reply=ca.HoldDone, timeout=CA_TIMEOUT, retry=CA_RETRY)
    def s02_hold_both(data: TemporaryLossData, ctx: StepContext) -> ca.Hold:
        """2. Suspend both."""
        return ca.Hold(command_id=key(ctx), selection=ca.Selection(se_cin=data.report.phone.se.cin))

    @s02_hold_both.done
    def _(data: TemporaryLossData, reply: ca.HoldDone) -> None:
        data.held = sorted(c.serial for c in reply.changes)

    @s02_hold_both.undo(timeout=CA_TIMEOUT)
    def _(data: TemporaryLossData, ctx: StepContext) -> ca.Revoke:
        # Runs when the wait ends without an authenticated found report: whatever is still
        # live on the SE goes (keyCompromise).
        return ca.Revoke(command_id=key(ctx, undo=True), cause=Cause.NOT_FOUND,
                         selection=ca.Selection(se_cin=data.report.phone.se.cin))

    @flow.event(FoundReport, timeout=not_found_period_s, retry=Retry(max_attempts=1),
                to_device=False)
    def s03_until_found(data: TemporaryLossData) -> None:
        """3. The durable timer: found in time, or revoked."""
        return None

    @s03_until_found.done
    def _(data: TemporaryLossData, found: FoundReport) -> None:
        data.found = found

    @flow.local
    def s04_found_authenticated(data: TemporaryLossData, ctx: StepContext) -> None:
        """4. Only an operator's found report ends the wait."""
        if data.found is None or data.found.phone.se != data.report.phone.se:
            raise callcentre.NotAuthenticated("found report for another phone")
        callcentre.authenticate(data.found, ctx.now)

    return flow


temporary_loss = temporary_loss_flow()
