"""The saga engine: flows as code, durable state, outbox, inbox, timers, compensation.

Writing a flow (see ``flow.py`` for every option)::

    from orchestrator.saga import Flow, Retry, Failure

    class OrderData(msgspec.Struct):      # the saga's data, stored as JSON
        order_id: str
        reservation: str | None = None

    order = Flow("demo.order", OrderData, deadline=600)

    @order.command(timeout=5, retry=Retry(max_attempts=3), reply=Reserved)
    def reserve(data):                    # returns the command (a registered message body)
        return Reserve(order_id=data.order_id)

    @reserve.done
    def _(data, reply):                   # fold the reply into the data
        data.reservation = reply.reservation

    @reserve.undo
    def _(data):                          # compensation, retried until done
        return Release(order_id=data.order_id)

    @order.command(when=lambda d: d.express)   # a branch
    def ship_express(data): ...

    @order.event(CardSignature, timeout=600)   # await an event from the phone
    def card_signature(data):
        return RequestCardSignature(...)       # sent first, to device.<device_id>

Participants reply with the command's ``saga_id`` and ``causation_id=<command message id>``
and, when they did not do it, ``failure=Failure(code=..., disposition=...)``: rejected →
compensate the done steps in reverse; transient → retry per the step's policy.

Running it::

    engine = SagaEngine(db, transport, [order], queue="orchestrator",
                        bindings=["*.reply.#", "app.event.#"])
    await engine.start()                       # consumer + outbox relay + timer loop
    saga_id = await engine.start_saga(order, OrderData(order_id="o1"))
    await engine.pause(saga_id, "operator: checking"); await engine.resume(saga_id)
    view = await engine.get(saga_id)           # status, step, data, reason, timeline
"""

from orchestrator.saga.flow import (
    DEFAULT_RETRY,
    UNDO_RETRY,
    Failure,
    Flow,
    FlowDefinitionError,
    Retry,
    Step,
    StepContext,
)

__all__ = [
    "DEFAULT_RETRY",
    "UNDO_RETRY",
    "Failure",
    "Flow",
    "FlowDefinitionError",
    "Retry",
    "Step",
    "StepContext",
]
