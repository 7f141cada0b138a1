"""PIN change (FLOWS.md §4): local only. The app VERIFYs the old PIN and CHANGEs it on the
SE; the back end only records that it happened — which PIN, on which SE, when; never what.
"""

from __future__ import annotations

import msgspec
import structlog

from orchestrator.lifecycle_messages import PinChanged
from orchestrator.messages import CertificateKind, SeIdentity
from orchestrator.saga import Flow, StepContext
from protocol.envelope import Message

log = structlog.get_logger("flows.pin_change")

FLOW_NAME = "lifecycle.pin_change"


class PinChangeData(msgspec.Struct, kw_only=True):
    device_id: str
    se: SeIdentity
    kind: CertificateKind
    changed_at: str
    recorded_at: float | None = None


def from_report(message: Message) -> PinChangeData:
    report: PinChanged = message.body
    return PinChangeData(device_id=report.device_id, se=report.se, kind=report.kind,
                         changed_at=report.changed_at.isoformat())


pin_change: Flow[PinChangeData] = Flow(
    FLOW_NAME, PinChangeData, deadline=60, start_on=PinChanged, initial=from_report,
)


@pin_change.local
def s01_record(data: PinChangeData, ctx: StepContext) -> None:
    """1. The record is this saga (row and timeline); nothing else changes anywhere."""
    data.recorded_at = ctx.now
    log.info("pin_change_recorded", saga_id=ctx.saga_id, device_id=data.device_id,
             se=data.se.cin, kind=data.kind.value)
