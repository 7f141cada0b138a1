"""The life-cycle flows of FLOWS.md §4, one module each, as the orchestrator registers them.

| flow | started by | module |
|---|---|---|
| PIN change (recorded) | app: ``app.event.pin_changed`` | ``pin_change.py`` |
| PIN reset | app: ``app.event.pin_reset`` | ``pin_reset.py`` |
| reissue | app: a new enrolment on the same SE | ``issuance.py`` (branch reissue_same_se) |
| model change | app: enrolment on the new phone | ``issuance.py`` (model_change) + ``online.py`` |
| disposal | app: ``app.event.disposal`` | ``disposal.py`` |
| stale applet clean-up | app: ``app.event.online`` | ``online.py`` |
| loss, failure | call centre: ``callcentre.cmd.loss`` / ``.failure`` | ``loss.py`` |
| temporary loss, not found | call centre: ``…temporary_loss`` | ``temporary_loss.py`` |
| found | call centre: ``callcentre.cmd.found`` | ``found.py`` |
| card cascade | call centre: ``callcentre.cmd.card_cascade`` | ``card_cascade.py`` |
"""

from __future__ import annotations

from typing import Any

from orchestrator.flows.card_cascade import card_cascade
from orchestrator.flows.disposal import disposal
from orchestrator.flows.found import found
from orchestrator.flows.loss import failure, loss
from orchestrator.flows.online import online
from orchestrator.flows.pin_change import pin_change
from orchestrator.flows.pin_reset import pin_reset
from orchestrator.flows.temporary_loss import NOT_FOUND_PERIOD_S, temporary_loss_flow
from orchestrator.saga import Flow


def lifecycle_flows(not_found_period_s: float = NOT_FOUND_PERIOD_S) -> tuple[Flow[Any], ...]:
    return (pin_change, pin_reset, disposal, online, loss, failure,
            temporary_loss_flow(not_found_period_s), found, card_cascade)
