"""The SP-TSM's engine (``workers.tsm.engine.TsmEngine``) on the bus: the ``tsm`` queue in,
``tsm.reply.*`` out, and the phone reached through the transport.

A command runs in its own task (an SCP03 script waits for the phone, and the phone's answer
arrives on this same queue); it is acked once its reply is published, so a worker that dies
mid-operation has the command redelivered and the engine re-runs it safely. Scripts go out
as ``se.cmd.script`` on ``device.<device_id>`` (the gateway or the in-process phone link
delivers them) and come back as ``se.result.script``, matched by script id.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from typing import Any

import structlog

from infra.bus import SERVICE_QUEUES
from infra.db import Database, upgrade
from infra.db.outbox import outgoing
from infra.transport.base import Delivery, Subscription, Transport
from protocol.envelope import InvalidMessage, build, decode
from workers.tsm import messages as m
from workers.tsm.engine import PhoneUnreachable, TsmEngine
from workers.tsm.keys import MasterKeyRing
from workers.tsm.registry import SqlRegistry

log = structlog.get_logger("tsm.worker")

QUEUE = "tsm"
SCRIPT_TIMEOUT_S = 10.0

# the saga of the command being run, so that its scripts carry it to the phone and back
_saga: contextvars.ContextVar[str | None] = contextvars.ContextVar("tsm_saga", default=None)


class BusPhoneLink:
    """``TsmEngine``'s phone link over the transport (the gateway or the in-process hub)."""

    def __init__(self, transport: Transport, timeout_s: float = SCRIPT_TIMEOUT_S) -> None:
        self._transport = transport
        self._timeout = timeout_s
        self._waiting: dict[str, asyncio.Future[m.SeScriptResult]] = {}
        self.round_trips = 0

    async def exchange(self, device_id: str, script: m.SeScript) -> m.SeScriptResult:
        future: asyncio.Future[m.SeScriptResult] = asyncio.get_running_loop().create_future()
        self._waiting[script.script_id] = future
        message = build(script, saga_id=_saga.get(), device_id=device_id)
        try:
            await self._transport.publish([outgoing(message, routing_key=f"device.{device_id}")])
            self.round_trips += 1
            return await asyncio.wait_for(future, self._timeout)
        except TimeoutError:
            raise PhoneUnreachable("no answer from the phone in time") from None
        finally:
            self._waiting.pop(script.script_id, None)

    def answered(self, result: m.SeScriptResult) -> bool:
        future = self._waiting.get(result.script_id)
        if future is None or future.done():
            return False
        future.set_result(result)
        return True


class TsmWorker:
    def __init__(
        self, db: Database, transport: Transport, keys: MasterKeyRing, *, prefetch: int = 1024
    ) -> None:
        self.db = db
        self.transport = transport
        self.link = BusPhoneLink(transport)
        self.engine = TsmEngine(keys, SqlRegistry(db), self.link)
        self._prefetch = prefetch
        self._subscription: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await upgrade(self.db, "tsm")
        await self.transport.declare_queue(QUEUE, SERVICE_QUEUES[QUEUE])
        self._subscription = await self.transport.consume(QUEUE, self._on_delivery,
                                                          prefetch=self._prefetch)
        log.info("tsm.worker_started", queue=QUEUE)

    async def stop(self) -> None:
        if self._subscription is not None:
            await self._subscription.cancel()
            self._subscription = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_delivery(self, delivery: Delivery) -> None:
        try:
            message = decode(delivery.body)
        except InvalidMessage as exc:
            await delivery.park(str(exc))
            return
        body = message.body
        if isinstance(body, m.SeScriptResult):
            if not self.link.answered(body):
                log.info("tsm.late_script_result", script_id=body.script_id)
            await delivery.ack()
            return
        if not isinstance(body, m.TsmCommand):
            await delivery.park(f"not a TSM command: {message.envelope.type}")
            return
        task = asyncio.create_task(self._run(delivery, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, delivery: Delivery, message: Any) -> None:
        _saga.set(message.envelope.saga_id)
        started = time.perf_counter()
        try:
            reply = await self.engine.execute(message.body)
            answer = build(reply, saga_id=message.envelope.saga_id,
                           device_id=message.envelope.device_id,
                           causation_id=message.envelope.message_id)
            await self.transport.publish([outgoing(answer)])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an engine bug: retry via the queue's delivery limit
            log.error("tsm.command_failed", type=message.envelope.type, error=type(exc).__name__)
            await delivery.retry()
            return
        await delivery.ack()
        log.debug("tsm.command_answered", type=message.envelope.type,
                  seconds=round(time.perf_counter() - started, 4))
