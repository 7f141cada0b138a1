"""The demo saga: reserve → charge → ship, each undo beside its do.

``reject`` names a step the participant should refuse, ``stall`` one it should ignore
(so that its timeout, retries and the compensation after them show).
"""

from __future__ import annotations

import msgspec

from orchestrator.demo.messages import (
    Charge,
    Refund,
    Release,
    Reserve,
    Ship,
    StepReply,
    Unship,
)
from orchestrator.saga.flow import Flow, Retry


class OrderData(msgspec.Struct, kw_only=True):
    order_id: str
    amount: int = 100
    reject: str | None = None
    stall: str | None = None
    done: list[str] = msgspec.field(default_factory=list)


def demo_flow(*, timeout: float = 10.0, retry: Retry | None = None) -> Flow[OrderData]:
    """Build the flow; tests shorten the timeout and retries."""
    retry = retry or Retry(max_attempts=3, initial=0.2, max_delay=2.0)
    undo_retry = Retry(max_attempts=None, initial=0.2, max_delay=2.0)
    order = Flow("demo.order", OrderData, deadline=3600)

    def command(cls: type, data: OrderData, step: str) -> object:
        return cls(order_id=data.order_id, amount=data.amount,
                   reject=data.reject == step, stall=data.stall == step)

    def record(data: OrderData, reply: StepReply) -> None:
        data.done.append(reply.step)

    @order.command(timeout=timeout, retry=retry, reply=StepReply)
    def reserve(data: OrderData) -> object:
        return command(Reserve, data, "reserve")

    reserve.done(record)
    reserve.undo(lambda data: command(Release, data, ""), timeout=timeout, retry=undo_retry)

    @order.command(timeout=timeout, retry=retry, reply=StepReply)
    def charge(data: OrderData) -> object:
        return command(Charge, data, "charge")

    charge.done(record)
    charge.undo(lambda data: command(Refund, data, ""), timeout=timeout, retry=undo_retry)

    @order.command(timeout=timeout, retry=retry, reply=StepReply)
    def ship(data: OrderData) -> object:
        return command(Ship, data, "ship")

    ship.done(record)
    ship.undo(lambda data: command(Unship, data, ""), timeout=timeout, retry=undo_retry)
    return order
