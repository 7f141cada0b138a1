"""The SP-TSM on the bus: ``tsm.cmd.*`` in, ``tsm.reply.*`` out, scripts to the phones.

No delivery is held while a phone thinks. A command runs until its operation needs the
phone's answer (``TsmEngine.start``): the operation is stored in the registry with the
script it waits for, the script goes out as ``se.cmd.script`` on ``device.<device_id>``,
and the command is acked. The phone's ``se.result.script`` is a message of its own, taken
by whichever replica the queue gives it to: that replica resumes the operation from the
registry (``TsmEngine.resume``), sends the next script or publishes the reply, then acks.
So the queue's prefetch never fills with commands waiting for results behind them, and
any number of replicas share one queue.

A delivery is acked only after what it caused is stored and published: a replica that
dies in between has it redelivered, and every step is safe to run again (a command
restarts its operation; a result whose operation already moved on is dropped; a result
whose operation finished republishes the stored reply). Operations whose phone does not
answer within ``script_timeout_s`` end with a transient ``phone_unreachable`` reply.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from infra.bus import SERVICE_QUEUES
from infra.db import Database, upgrade
from infra.db.outbox import outgoing
from infra.transport.base import Delivery, Subscription, Transport
from protocol.envelope import InvalidMessage, build, decode
from workers.tsm import messages as m
from workers.tsm.engine import Finished, OperationContext, Step, TsmEngine, Waiting
from workers.tsm.keys import MasterKeyRing
from workers.tsm.registry import SqlRegistry

log = structlog.get_logger("tsm.worker")

QUEUE = "tsm"
SCRIPT_TIMEOUT_S = 10.0
SWEEP_INTERVAL_S = 1.0


class TsmWorker:
    def __init__(
        self,
        db: Database,
        transport: Transport,
        keys: MasterKeyRing,
        *,
        prefetch: int = 256,
        script_timeout_s: float = SCRIPT_TIMEOUT_S,
    ) -> None:
        self.db = db
        self.transport = transport
        self.engine = TsmEngine(keys, SqlRegistry(db), link=None)
        self._prefetch = prefetch
        self._script_timeout = script_timeout_s
        self._subscription: Subscription | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.scripts_sent = 0

    async def start(self) -> None:
        await upgrade(self.db, "tsm")
        await self.transport.declare_queue(QUEUE, SERVICE_QUEUES[QUEUE])
        self._subscription = await self.transport.consume(QUEUE, self._on_delivery,
                                                          prefetch=self._prefetch)
        self._sweeper = asyncio.create_task(self._sweep())
        log.info("tsm.worker_started", queue=QUEUE)

    async def stop(self) -> None:
        if self._subscription is not None:
            await self._subscription.cancel()
            self._subscription = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None

    async def _on_delivery(self, delivery: Delivery) -> None:
        try:
            message = decode(delivery.body)
        except InvalidMessage as exc:
            await delivery.park(str(exc))
            return
        body, envelope = message.body, message.envelope
        try:
            if isinstance(body, m.SeScriptResult):
                step = await self.engine.resume(body, body.script_id)
                if step is None:
                    log.info("tsm.late_script_result", script_id=body.script_id)
            elif isinstance(body, m.TsmCommand):
                context = OperationContext(saga_id=envelope.saga_id,
                                           device_id=envelope.device_id,
                                           causation_id=envelope.message_id)
                step = await self.engine.start(body, context)
            else:
                await delivery.park(f"not a TSM message: {envelope.type}")
                return
            if step is not None:
                await self._publish(step)
        except Exception as exc:  # an engine or store fault: retry via the delivery limit
            log.error("tsm.delivery_failed", type=envelope.type, error=type(exc).__name__)
            await delivery.retry()
            return
        await delivery.ack()

    async def _publish(self, step: Step) -> None:
        context = step.context
        if isinstance(step, Waiting):
            message = build(step.script, saga_id=context.saga_id, device_id=step.device_id)
            await self.transport.publish(
                [outgoing(message, routing_key=f"device.{step.device_id}")]
            )
            self.scripts_sent += 1
            return
        assert isinstance(step, Finished)
        answer = build(step.reply, saga_id=context.saga_id, device_id=context.device_id,
                       causation_id=context.causation_id)
        await self.transport.publish([outgoing(answer)])

    async def _sweep(self) -> None:
        """End operations whose phone never answered (any replica may; a second ending of
        the same operation finds it already done and republishes the same reply)."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                for script_id in await self.engine.registry.overdue(
                    time.time() - self._script_timeout
                ):
                    step = await self.engine.resume(None, script_id)
                    if step is not None:
                        log.warning("tsm.phone_did_not_answer", script_id=script_id)
                        await self._publish(step)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store or the broker is away: try next round
                log.error("tsm.sweep_failed", error=type(exc).__name__)
