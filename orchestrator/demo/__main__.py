"""Run the demo saga's processes.

    python -m orchestrator.demo participant --amqp-url amqp://... [--db-url ... | --data-dir d]
    python -m orchestrator.demo orchestrator --amqp-url amqp://... --start 300 --reject-every 7
    python -m orchestrator.demo run --sagas 1000          # both, in one process, no broker

``--start N`` starts sagas ``<id-prefix>-000000`` .. ``N-1`` that do not exist yet, so a
restarted orchestrator picks up where it was killed. Every ``--reject-every``-th saga asks
the participant to reject its ``charge`` step (and is compensated).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import click

from infra.db import Database, upgrade
from infra.logging import configure_logging
from infra.transport.base import Transport
from infra.transport.inprocess import InProcessTransport
from infra.transport.rabbitmq import RabbitMQTransport
from orchestrator.demo.flow import OrderData, demo_flow
from orchestrator.demo.participant import DemoParticipant
from orchestrator.saga.engine import SagaEngine

ORCHESTRATOR_QUEUE = "demo-orchestrator"


def _transport(amqp_url: str, exchange: str) -> Transport:
    return RabbitMQTransport(amqp_url, exchange=exchange, dead_letter_exchange=f"{exchange}.dlx",
                             connection_name="jpki-demo")


def _orders(count: int, reject_every: int) -> list[OrderData]:
    def rejects(i: int) -> bool:
        return reject_every > 0 and i % reject_every == reject_every - 1

    return [
        OrderData(order_id=f"{i:06d}", reject="charge" if rejects(i) else None)
        for i in range(count)
    ]


async def _until_stopped() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


@click.group()
@click.option("--log-level", default="WARNING", show_default=True)
def cli(log_level: str) -> None:
    """The demo saga (reserve → charge → ship) and its counting participant."""
    configure_logging("demo", level=log_level)


def _common(fn):  # type: ignore[no-untyped-def]
    fn = click.option("--amqp-url", required=True, help="RabbitMQ URL")(fn)
    fn = click.option("--db-url", default=None, help="PostgreSQL URL (default: SQLite)")(fn)
    fn = click.option("--schema", default=None, help="PostgreSQL schema")(fn)
    fn = click.option("--data-dir", default="data", show_default=True)(fn)
    fn = click.option("--exchange", default="jpki", show_default=True)(fn)
    fn = click.option("--queue-prefix", default="", help="prefix of queue names")(fn)
    return fn


@cli.command()
@_common
@click.option("--work-ms", default=0.0, show_default=True,
              help="simulated work per command, milliseconds")
def participant(amqp_url: str, db_url: str | None, schema: str | None, data_dir: str,
                exchange: str, queue_prefix: str, work_ms: float) -> None:
    async def main() -> None:
        db = Database.for_service("demo_participant", url=db_url, data_dir=data_dir,
                                  schema=schema)
        await upgrade(db, "demo_participant")
        transport = _transport(amqp_url, exchange)
        await transport.connect()
        part = DemoParticipant(db, transport, queue=f"{queue_prefix}demo-participant",
                               work_seconds=work_ms / 1000)
        await part.start()
        await _until_stopped()
        await part.stop()
        await transport.close()
        await db.close()

    asyncio.run(main())


@cli.command()
@_common
@click.option("--start", "count", default=0, show_default=True, help="sagas to start")
@click.option("--reject-every", default=0, show_default=True)
@click.option("--id-prefix", default="demo", show_default=True)
@click.option("--timeout", default=5.0, show_default=True, help="step timeout, seconds")
def orchestrator(amqp_url: str, db_url: str | None, schema: str | None, data_dir: str,
                 exchange: str, queue_prefix: str, count: int, reject_every: int,
                 id_prefix: str, timeout: float) -> None:
    async def main() -> None:
        db = Database.for_service("orchestrator", url=db_url, data_dir=data_dir, schema=schema)
        await upgrade(db, "orchestrator")
        transport = _transport(amqp_url, exchange)
        await transport.connect()
        # the participant's queue must exist before the first command is published
        await transport.declare_queue(f"{queue_prefix}demo-participant", ["demo.cmd.#"])
        flow = demo_flow(timeout=timeout)
        engine = SagaEngine(db, transport, [flow], queue=f"{queue_prefix}{ORCHESTRATOR_QUEUE}",
                            bindings=["demo.reply.#"])
        await engine.start()
        orders = _orders(count, reject_every)
        for start in range(0, len(orders), 200):
            chunk = orders[start : start + 200]
            ids = [f"{id_prefix}-{start + i:06d}" for i in range(len(chunk))]
            await engine.start_sagas(flow, chunk, saga_ids=ids)
        await _until_stopped()
        await engine.stop()
        await transport.close()
        await db.close()

    asyncio.run(main())


@cli.command()
@click.option("--sagas", default=1000, show_default=True)
@click.option("--reject-every", default=0, show_default=True)
@click.option("--data-dir", default="data", show_default=True)
def run(sagas: int, reject_every: int, data_dir: str) -> None:
    """Orchestrator and participant in one process on the in-process transport."""

    async def main() -> None:
        transport = InProcessTransport()
        await transport.connect()
        odb = Database.for_service("orchestrator", data_dir=data_dir)
        pdb = Database.for_service("demo_participant", data_dir=data_dir)
        await upgrade(odb, "orchestrator")
        await upgrade(pdb, "demo_participant")
        flow = demo_flow()
        part = DemoParticipant(pdb, transport)
        engine = SagaEngine(odb, transport, [flow], queue=ORCHESTRATOR_QUEUE,
                            bindings=["demo.reply.#"])
        await part.start()
        await engine.start()
        began = time.perf_counter()
        await engine.start_sagas(flow, _orders(sagas, reject_every))
        while True:
            counts = await engine.counts()
            if counts.get("running", 0) + counts.get("compensating", 0) == 0:
                break
            await asyncio.sleep(0.1)
        elapsed = time.perf_counter() - began
        click.echo(f"{counts} in {elapsed:.2f}s ({sagas / elapsed:.0f} sagas/s)")
        await engine.stop()
        await part.stop()
        with contextlib.suppress(Exception):
            await transport.close()
        await odb.close()
        await pdb.close()

    asyncio.run(main())


if __name__ == "__main__":
    cli()
