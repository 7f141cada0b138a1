"""Telling the phone how a saga ended, in the same transaction as the end.

The engine's ``Machine`` finishes a saga (completed, compensated, or failed for the
operator) without sending anything. A flow whose user waits on a screen registers an
*ending* here: ``fn(data, status, reason) -> message body | None``; ``EndingMachine`` puts
that body in the outbox beside the saga's final state, so the phone is told exactly once
and never before the compensations are done.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from infra.db.outbox import outgoing
from orchestrator.saga.machine import Effects, Machine, SagaState
from protocol.envelope import build

Ending = Callable[[Any, str, str | None], object | None]

_ENDINGS: dict[str, Ending] = {}


def on_end(flow_name: str) -> Callable[[Ending], Ending]:
    def register(fn: Ending) -> Ending:
        _ENDINGS[flow_name] = fn
        return fn

    return register


class EndingMachine(Machine):
    """``Machine`` plus the ending message of flows that registered one."""

    def _finish(self, state: SagaState, fx: Effects, status: str) -> None:
        super()._finish(state, fx, status)
        ending = _ENDINGS.get(state.flow.name)
        device = state.flow.device
        if ending is None or device is None:
            return
        body = ending(state.data, status, state.reason)
        if body is None:
            return
        device_id = device(state.data)
        message = build(
            body,
            saga_id=state.saga_id,
            message_id=f"{state.saga_id}:end:{status}",
            device_id=device_id,
        )
        fx.outgoing.append(outgoing(message, routing_key=f"device.{device_id}"))
