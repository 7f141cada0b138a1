"""The orchestrator process: consumes the ``orchestrator`` queue, runs the sagas, relays the
outbox and fires the timers (all of it D's ``SagaEngine``), with the business flows.

``jpki orchestrator`` runs it on real services; ``jpki run`` embeds it with everything else.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import click
import structlog

from infra.bus import SERVICE_QUEUES
from infra.db import Database, upgrade
from infra.heap import freeze_start_up_objects
from infra.transport.base import Transport
from orchestrator.flows.ending import EndingMachine
from orchestrator.flows.issuance import issuance
from orchestrator.flows.lifecycle import lifecycle_flows
from orchestrator.saga import Flow
from orchestrator.saga.engine import SagaEngine

log = structlog.get_logger("orchestrator")

SERVICE = "orchestrator"
# new issuance, then the life-cycle flows of FLOWS.md §4 (orchestrator/flows/lifecycle.py)
FLOWS: tuple[Flow[Any], ...] = (issuance, *lifecycle_flows())


class Orchestrator:
    """The saga engine with this project's flows, on one database and one transport."""

    def __init__(
        self,
        db: Database,
        transport: Transport,
        *,
        flows: Sequence[Flow[Any]] = FLOWS,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        batch_size: int = 256,
        prefetch: int = 1024,
    ) -> None:
        self.db = db
        self.transport = transport
        self.engine = SagaEngine(
            db, transport, flows, queue=SERVICE, bindings=SERVICE_QUEUES[SERVICE],
            clock=clock, rng=rng, batch_size=batch_size, prefetch=prefetch,
        )
        # the same transitions, plus the phone's "how it ended" message in the outbox
        self.engine.machine = EndingMachine(self.engine.clock, self.engine.rng)

    async def start(self) -> None:
        await upgrade(self.db, SERVICE)
        await self.engine.start()
        log.info("orchestrator_started", flows=sorted(self.engine.registry.flows))

    async def stop(self) -> None:
        await self.engine.stop()
        log.info("orchestrator_stopped")


async def serve(amqp_url: str, db_url: str | None, data_dir: str) -> None:
    from infra.transport.rabbitmq import RabbitMQTransport

    transport = RabbitMQTransport(amqp_url, connection_name=SERVICE)
    db = Database.for_service(SERVICE, url=db_url, data_dir=data_dir)
    await transport.connect()
    orchestrator = Orchestrator(db, transport)
    try:
        await orchestrator.start()
        freeze_start_up_objects()
        await asyncio.Event().wait()  # until cancelled (SIGINT / SIGTERM)
    finally:
        await orchestrator.stop()
        await transport.close()
        await db.close()


@click.command("orchestrator")
@click.option("--amqp-url", envvar="JPKI_AMQP_URL", required=True,
              help="RabbitMQ URL (env JPKI_AMQP_URL)")
@click.option("--db-url", envvar="JPKI_DB_URL", default=None,
              help="PostgreSQL URL (env JPKI_DB_URL); default SQLite in --data-dir")
@click.option("--data-dir", default="data", show_default=True)
@click.option("--log-level", default="INFO", show_default=True)
def orchestrator_command(amqp_url: str, db_url: str | None, data_dir: str, log_level: str) -> None:
    """Run the saga orchestrator on RabbitMQ (and PostgreSQL)."""
    from infra.logging import configure_logging
    from jpki.run import run_until_signal

    configure_logging(SERVICE, level=log_level)
    run_until_signal(serve(amqp_url, db_url, data_dir))
