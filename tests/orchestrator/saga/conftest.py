"""A demo stack (engine + counting participant) on either backend.

``memory``: the in-process transport and SQLite files in ``tmp_path`` (always runs).
``broker``: RabbitMQ (an exchange and queues of this test's own) and PostgreSQL (two
fresh schemas, dropped afterwards); skipped loudly when a service is absent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from infra.db import Database, upgrade
from infra.transport.base import Outgoing, Transport
from infra.transport.inprocess import InProcessTransport
from infra.transport.rabbitmq import RabbitMQTransport
from orchestrator.demo.flow import demo_flow
from orchestrator.demo.participant import DemoParticipant, effect_log
from orchestrator.saga import Flow
from orchestrator.saga.engine import SagaEngine, SagaView
from orchestrator.saga.machine import TERMINAL

BACKENDS = [
    pytest.param("memory", id="inprocess-sqlite"),
    pytest.param("broker", id="rabbitmq-postgres",
                 marks=[pytest.mark.rabbitmq, pytest.mark.postgres]),
]


class DuplicatingTransport(Transport):
    """Publishes every message twice: the receivers must apply each effect once."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner

    async def connect(self) -> None:
        await self.inner.connect()

    async def close(self) -> None:
        await self.inner.close()

    async def declare_queue(self, queue: str, binding_keys: Sequence[str], **kw: Any) -> None:
        await self.inner.declare_queue(queue, binding_keys, **kw)

    async def publish(self, messages: Sequence[Outgoing]) -> None:
        await self.inner.publish([m for m in messages for _ in range(2)])

    async def consume(self, queue, handler, *, prefetch=64):
        return await self.inner.consume(queue, handler, prefetch=prefetch)

    async def park(self, queue, message, reason):
        await self.inner.park(queue, message, reason)

    async def parked(self, queue, limit=100):
        return await self.inner.parked(queue, limit)

    async def replay_parked(self, queue, message_ids=None):
        return await self.inner.replay_parked(queue, message_ids)

    async def queue_depths(self):
        return await self.inner.queue_depths()


@dataclass
class Stack:
    transport: Transport
    orchestrator_db: Database
    participant_db: Database
    engine: SagaEngine
    participant: DemoParticipant
    flow: Flow[Any]
    cleanups: list[Callable[[], Any]] = field(default_factory=list)

    async def wait_terminal(
        self, saga_ids: Sequence[str], within: float = 30.0
    ) -> dict[str, SagaView]:
        deadline = time.monotonic() + within
        while True:
            views = {s: await self.engine.get(s) for s in saga_ids}
            if all(v.status in TERMINAL for v in views.values()):
                return views
            if time.monotonic() > deadline:
                stuck = {s: (v.status, v.step, v.waiting) for s, v in views.items()
                         if v.status not in TERMINAL}
                raise AssertionError(f"sagas not terminal after {within}s: {stuck}")
            await asyncio.sleep(0.05)

    async def effects(self) -> list[tuple[str, str, str]]:
        return await effect_log(self.participant_db)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> dict[str, str]:
    if request.param == "memory":
        return {"kind": "memory"}
    return {
        "kind": "broker",
        "amqp_url": request.getfixturevalue("amqp_url"),
        "pg_url": request.getfixturevalue("pg_url"),
        "unique": request.getfixturevalue("unique"),
    }


@pytest.fixture
async def make_stack(backend: dict[str, str], tmp_path) -> AsyncIterator[Callable[..., Any]]:
    stacks: list[Stack] = []

    async def make(
        *,
        flow: Flow[Any] | None = None,
        duplicate: bool = False,
        clock: Callable[[], float] = time.time,
        **engine_kw: Any,
    ) -> Stack:
        flow = flow or demo_flow()
        suffix = f"-{len(stacks)}"
        if backend["kind"] == "memory":
            inner: Transport = InProcessTransport()
            odb = Database.for_service("orchestrator", data_dir=tmp_path / f"o{suffix}")
            pdb = Database.for_service("demo_participant", data_dir=tmp_path / f"p{suffix}")
            prefix = ""
        else:
            unique = backend["unique"] + suffix.replace("-", "_")
            inner = RabbitMQTransport(backend["amqp_url"], exchange=f"jpki-test-{unique}",
                                      dead_letter_exchange=f"jpki-test-{unique}.dlx")
            odb = Database(backend["pg_url"], schema=f"orch_{unique}")
            pdb = Database(backend["pg_url"], schema=f"part_{unique}")
            prefix = f"{unique}-"
        await inner.connect()
        transport = DuplicatingTransport(inner) if duplicate else inner
        await upgrade(odb, "orchestrator")
        await upgrade(pdb, "demo_participant")
        engine = SagaEngine(odb, transport, [flow], queue=f"{prefix}demo-orchestrator",
                            bindings=["demo.reply.#"], clock=clock, **engine_kw)
        participant = DemoParticipant(pdb, transport, queue=f"{prefix}demo-participant")
        await participant.start()
        await engine.start()
        stack = Stack(transport, odb, pdb, engine, participant, flow)
        if backend["kind"] == "broker":
            stack.cleanups.append(inner.delete_topology)  # type: ignore[attr-defined]
            stack.cleanups.append(odb.drop_schema)
            stack.cleanups.append(pdb.drop_schema)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        await stack.engine.stop()
        await stack.participant.stop()
        for cleanup in stack.cleanups:
            await cleanup()
        await stack.transport.close()
        await stack.orchestrator_db.close()
        await stack.participant_db.close()
