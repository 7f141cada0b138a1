"""What the life-cycle flows (FLOWS.md §4) share: timeouts, idempotency keys, refusals and
the ending message. Each flow is its own module; ``lifecycle.py`` lists them."""

from __future__ import annotations

from orchestrator.lifecycle_messages import (
    LifecycleFlow,
    LifecycleOutcome,
    LifecycleReason,
    LifecycleResult,
)
from orchestrator.saga import Retry, StepContext
from orchestrator.saga.machine import COMPLETED
from protocol.errors import JpkiError

# As issuance (orchestrator/flows/issuance.py): one SCP03 script is one round trip.
SE_TIMEOUT = 15.0
SE_RETRY = Retry(max_attempts=3, initial=0.5)
CA_TIMEOUT = 10.0
CA_RETRY = Retry(max_attempts=4, initial=0.2)
USER_TIMEOUT = 10 * 60.0


class Refused(JpkiError):
    """A life-cycle step refuses (the saga data names the reason code): compensate."""


def key(ctx: StepContext, undo: bool = False) -> str:
    """The TSM's / CA's idempotency key of a step: ``<saga id>:<step>[:undo]``."""
    return f"{ctx.saga_id}:{ctx.step}" + (":undo" if undo else "")


def result(
    flow: LifecycleFlow,
    status: str,
    reason: str | None,
    refusal: LifecycleReason | None,
    *,
    applet_deleted: bool = False,
) -> LifecycleResult:
    """The phone's ending: done, refused (a step refused with a code) or failed."""
    if status == COMPLETED:
        return LifecycleResult(flow=flow, outcome=LifecycleOutcome.DONE,
                               applet_deleted=applet_deleted)
    if refusal is not None:
        return LifecycleResult(flow=flow, outcome=LifecycleOutcome.REFUSED, reason=refusal)
    text = reason or ""
    if text.startswith("aborted by"):
        code = LifecycleReason.USER_CANCELLED
    elif "timeout" in text or "deadline" in text:
        code = LifecycleReason.TIMEOUT
    else:
        code = LifecycleReason.INTERNAL
    return LifecycleResult(flow=flow, outcome=LifecycleOutcome.FAILED, reason=code)
