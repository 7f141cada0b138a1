"""The SP-TSM on the bus: ``tsm.cmd.*`` in, ``tsm.reply.*`` out, scripts to the phones.

No delivery is held while a phone thinks. A command runs until its operation needs the
phone's answer (``TsmEngine.start``): the operation is stored in the registry with the
script it waits for, the script goes out as ``se.cmd.script`` on ``device.<device_id>``,
and the command is acked. The phone's ``se.result.script`` is a message of its own, taken
by whichever replica the queue gives it to: that replica resumes the operation from the
registry (``TsmEngine.resume``), sends the next script or publishes the reply, then acks.
So the queue's prefetch never fills with commands waiting for results behind them, and
any number of replicas share one queue.

Deliveries are handled in batches by one worker task, all of a batch's registry work in
one transaction (group commit: one commit for up to ``batch_size`` deliveries instead of
one each, which on SQLite was most of the TSM's database cost and on PostgreSQL one
fsync each). The unit reads what the batch will need in two statements before it runs
and writes what it changed in one statement per kind before the commit, so a batch's
round trips to the database do not grow with its size. If a batch fails, its deliveries
run again one by one, so one bad delivery costs only itself. A delivery is acked only
after what it caused is committed and published: a replica that dies in between has it
redelivered, and every step is safe to run again (a command restarts its operation; a
result whose operation already moved on is dropped; a result whose operation finished
republishes the stored reply). Operations whose phone does not answer within
``script_timeout_s`` end with a transient ``phone_unreachable`` reply; the sweeper that
finds them hands them to the same worker, so one task alone runs the engine and takes
its per-SE locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import structlog

from infra.batches import Batches
from infra.bus import SERVICE_QUEUES
from infra.db import Database, upgrade
from infra.db.outbox import outgoing
from infra.transport.base import Delivery, Outgoing, Subscription, Transport
from protocol.envelope import InvalidMessage, Message, build, decode
from workers.tsm import messages as m
from workers.tsm.engine import Finished, OperationContext, Step, TsmEngine, Waiting
from workers.tsm.keys import MasterKeyRing
from workers.tsm.registry import Prefetch, Registry, SqlRegistry

log = structlog.get_logger("tsm.worker")

QUEUE = "tsm"
SCRIPT_TIMEOUT_S = 10.0
SWEEP_INTERVAL_S = 1.0


@dataclass(slots=True)
class _Work:
    """One unit for the worker: a delivery with its decoded message, or the id of a script
    whose phone did not answer in time (from the sweeper)."""

    delivery: Delivery | None = None
    message: Message | None = None
    timed_out: str | None = None


class TsmWorker:
    def __init__(
        self,
        db: Database,
        transport: Transport,
        keys: MasterKeyRing,
        *,
        prefetch: int = 256,
        batch_size: int = 64,
        script_timeout_s: float = SCRIPT_TIMEOUT_S,
    ) -> None:
        self.db = db
        self.transport = transport
        self._registry = SqlRegistry(db)
        self.engine = TsmEngine(keys, self._registry, link=None)
        self._prefetch = prefetch
        self._script_timeout = script_timeout_s
        self._subscription: Subscription | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._batches: Batches[_Work] = Batches(self._run_batch, batch_size=batch_size,
                                                name="tsm-worker")
        self._timing_out: set[str] = set()  # script ids handed to the worker by the sweeper
        self.scripts_sent = 0

    async def start(self) -> None:
        await upgrade(self.db, "tsm")
        await self.transport.declare_queue(QUEUE, SERVICE_QUEUES[QUEUE])
        self._batches.start()
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
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self._batches.stop()
        self._timing_out.clear()

    async def _on_delivery(self, delivery: Delivery) -> None:
        try:
            message = decode(delivery.body)
        except InvalidMessage as exc:
            await delivery.park(str(exc))
            return
        if not isinstance(message.body, m.SeScriptResult | m.TsmCommand):
            await delivery.park(f"not a TSM message: {message.envelope.type}")
            return
        # Returns unsettled: the worker settles it once its batch commits.
        self._batches.put(_Work(delivery, message))

    async def _run_batch(self, batch: list[_Work]) -> None:
        try:
            async with self._registry.unit(_needs(batch)) as registry:
                steps = [await self._handle(work, registry) for work in batch]
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an engine or store fault
            if len(batch) > 1:
                log.warning("tsm.batch_failed_retrying_singly", size=len(batch),
                            error=type(exc).__name__)
                for work in batch:
                    await self._run_batch([work])
                return
            await self._failed(batch[0], exc)
            return
        outgoing_messages = [self._outgoing(step) for step in steps if step is not None]
        try:
            if outgoing_messages:
                await self.transport.publish(outgoing_messages)
        except Exception as exc:  # committed but not out: a redelivery publishes it again
            log.error("tsm.publish_failed", size=len(outgoing_messages),
                      error=type(exc).__name__)
            for work in batch:
                await self._settle_retry(work)
            return
        self.scripts_sent += sum(isinstance(step, Waiting) for step in steps)
        deliveries = [work.delivery for work in batch if work.delivery is not None]
        with contextlib.suppress(Exception):  # a lost ack means a redelivery: safe to rerun
            await self.transport.ack_many(deliveries)
        for work in batch:
            if work.timed_out is not None:
                self._timing_out.discard(work.timed_out)

    async def _handle(self, work: _Work, registry: Registry) -> Step | None:
        if work.message is None:  # the sweeper's: the phone did not answer in time
            assert work.timed_out is not None
            step = await self.engine.resume(None, work.timed_out, registry=registry)
            if step is not None:
                log.warning("tsm.phone_did_not_answer", script_id=work.timed_out)
            return step
        body, envelope = work.message.body, work.message.envelope
        if isinstance(body, m.SeScriptResult):
            step = await self.engine.resume(body, body.script_id, registry=registry)
            if step is None:
                log.info("tsm.late_script_result", script_id=body.script_id)
            return step
        context = OperationContext(saga_id=envelope.saga_id, device_id=envelope.device_id,
                                   causation_id=envelope.message_id)
        return await self.engine.start(body, context, registry=registry)

    async def _failed(self, work: _Work, exc: Exception) -> None:
        log.error("tsm.delivery_failed", error=type(exc).__name__,
                  type=work.message.envelope.type if work.message is not None else "timeout")
        await self._settle_retry(work)

    async def _settle_retry(self, work: _Work) -> None:
        if work.delivery is not None:
            with contextlib.suppress(Exception):
                await work.delivery.retry()  # retry via the delivery limit
        elif work.timed_out is not None:
            self._timing_out.discard(work.timed_out)  # the next sweep finds it again

    def _outgoing(self, step: Step) -> Outgoing:
        context = step.context
        if isinstance(step, Waiting):
            message = build(step.script, saga_id=context.saga_id, device_id=step.device_id)
            return outgoing(message, routing_key=f"device.{step.device_id}")
        assert isinstance(step, Finished)
        answer = build(step.reply, saga_id=context.saga_id, device_id=context.device_id,
                       causation_id=context.causation_id)
        return outgoing(answer)

    async def _sweep(self) -> None:
        """Hand the worker the operations whose phone never answered (any replica may; a
        second ending of the same operation finds it already done and republishes the
        same reply)."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                overdue = await self._registry.overdue(time.time() - self._script_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store or the broker is away: try next round
                log.error("tsm.sweep_failed", error=type(exc).__name__)
                continue
            fresh = [script_id for script_id in overdue if script_id not in self._timing_out]
            if fresh:
                self._timing_out.update(fresh)
                self._batches.put_many([_Work(timed_out=script_id) for script_id in fresh])


def _needs(batch: list[_Work]) -> Prefetch:
    """The rows a batch's deliveries will read: its commands' operations and SEs, and the
    operations waiting for its scripts' answers (and timeouts)."""
    commands: dict[str, str] = {}
    script_ids: list[str] = []
    for work in batch:
        body = work.message.body if work.message is not None else None
        if isinstance(body, m.TsmCommand):
            commands[body.command_id] = body.se.cin
        elif isinstance(body, m.SeScriptResult):
            script_ids.append(body.script_id)
        elif work.timed_out is not None:
            script_ids.append(work.timed_out)
    return Prefetch(commands, script_ids)
