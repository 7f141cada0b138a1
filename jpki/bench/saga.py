"""``jpki bench saga``: demo-saga throughput on both backends, beside raw aio-pika.

- in-process + SQLite: the embedded default, the orchestrator and the demo participant in
  this process, each with its own SQLite file in a temporary directory;
- RabbitMQ + PostgreSQL: the same two services on the broker, each with a fresh schema;
- raw aio-pika: persistent messages published with confirms into a quorum queue and
  consumed with acks at the same time, by aio-pika alone: the ceiling the broker and the
  client library give on this machine, measured in the same run.

A demo saga is three steps (reserve, charge, ship): four orchestrator transactions, three
participant transactions and six messages. Every run uses its own exchange, queues and
schemas and removes them afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
import uuid

import aio_pika
import click
import structlog

from infra.db import Database, upgrade
from infra.transport.base import Transport
from infra.transport.inprocess import InProcessTransport
from infra.transport.rabbitmq import RabbitMQTransport
from jpki.bench.machine import machine
from orchestrator.demo.flow import OrderData, demo_flow
from orchestrator.demo.participant import DemoParticipant
from orchestrator.saga.engine import SagaEngine

DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_PG = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


async def _run_sagas(
    transport: Transport, orchestrator_db: Database, participant_db: Database, sagas: int,
    prefix: str,
) -> tuple[float, float, float]:
    """Returns (sagas per second, CPU ms per saga of the process, of its event-loop thread)."""
    await upgrade(orchestrator_db, "orchestrator")
    await upgrade(participant_db, "demo_participant")
    flow = demo_flow(timeout=60)
    participant = DemoParticipant(participant_db, transport, queue=f"{prefix}demo-participant")
    engine = SagaEngine(orchestrator_db, transport, [flow], queue=f"{prefix}demo-orchestrator",
                        bindings=["demo.reply.#"])
    await participant.start()
    await engine.start()
    try:
        began, cpu_began, loop_began = time.perf_counter(), time.process_time(), time.thread_time()
        orders = [OrderData(order_id=f"{i:07d}") for i in range(sagas)]
        for start in range(0, sagas, 500):
            await engine.start_sagas(flow, orders[start : start + 500])
        while True:
            counts = await engine.counts()
            if counts.get("completed", 0) + counts.get("compensated", 0) >= sagas:
                break
            await asyncio.sleep(0.2)
        elapsed = time.perf_counter() - began
        cpu = time.process_time() - cpu_began
        loop_cpu = time.thread_time() - loop_began
        if counts.get("completed", 0) != sagas:
            raise click.ClickException(f"demo sagas did not all complete: {counts}")
        return sagas / elapsed, 1000 * cpu / sagas, 1000 * loop_cpu / sagas
    finally:
        await engine.stop()
        await participant.stop()


async def bench_inprocess(sagas: int) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory(prefix="jpki-bench-") as data_dir:
        transport = InProcessTransport()
        await transport.connect()
        odb = Database.for_service("orchestrator", data_dir=data_dir)
        pdb = Database.for_service("demo_participant", data_dir=data_dir)
        try:
            return await _run_sagas(transport, odb, pdb, sagas, "")
        finally:
            await transport.close()
            await odb.close()
            await pdb.close()


async def bench_rabbitmq(
    sagas: int, amqp_url: str, pg_url: str
) -> tuple[float, float, float]:
    tag = uuid.uuid4().hex[:8]
    transport = RabbitMQTransport(amqp_url, exchange=f"jpki-bench-{tag}",
                                  dead_letter_exchange=f"jpki-bench-{tag}.dlx",
                                  connection_name="jpki-bench-saga")
    await transport.connect()
    odb = Database(pg_url, schema=f"bench_o_{tag}")
    pdb = Database(pg_url, schema=f"bench_p_{tag}")
    try:
        return await _run_sagas(transport, odb, pdb, sagas, f"bench-{tag}-")
    finally:
        await transport.delete_topology()
        await transport.close()
        for db in (odb, pdb):
            await db.drop_schema()
            await db.close()


async def bench_raw_aiopika(amqp_url: str, count: int) -> tuple[float, float]:
    """Persistent publish (confirms, 1,000 in flight) and consume+ack at the same time;
    returns (messages per second, CPU ms per message of this process)."""
    connection = await aio_pika.connect_robust(amqp_url)
    queue_name = f"jpki-bench-raw-{uuid.uuid4().hex[:8]}"
    body = b'{"type":"demo.reply.step","body":{"step":"charge","action":"do","applied":true}}'
    try:
        publish_channel = await connection.channel(publisher_confirms=True)
        consume_channel = await connection.channel()
        await consume_channel.set_qos(prefetch_count=1000)
        queue = await consume_channel.declare_queue(
            queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        received = 0
        finished = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal received
            await message.ack()
            received += 1
            if received >= count:
                finished.set()

        began, cpu_began = time.perf_counter(), time.process_time()
        consumer_tag = await queue.consume(on_message)
        exchange = publish_channel.default_exchange
        for start in range(0, count, 1000):
            await asyncio.gather(*(
                exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                     message_id=f"{start + i}"),
                    routing_key=queue_name,
                )
                for i in range(min(1000, count - start))
            ))
        await asyncio.wait_for(finished.wait(), 300)
        elapsed = time.perf_counter() - began
        cpu = time.process_time() - cpu_began
        await queue.cancel(consumer_tag)
        await queue.delete(if_unused=False, if_empty=False)
        return count / elapsed, 1000 * cpu / count
    finally:
        await connection.close()


@click.command("saga")
@click.option("--sagas", default=5000, show_default=True, help="demo sagas per backend")
@click.option("--backend", type=click.Choice(["inprocess", "rabbitmq", "both"]),
              default="both", show_default=True)
@click.option("--amqp-url", default=DEFAULT_AMQP, show_default=True)
@click.option("--pg-url", default=DEFAULT_PG, show_default=True)
@click.option("--raw-messages", default=20000, show_default=True,
              help="messages for the raw aio-pika rate")
def saga_bench(sagas: int, backend: str, amqp_url: str, pg_url: str, raw_messages: int) -> None:
    """Demo-saga throughput (three steps) next to the raw aio-pika rate."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    async def run() -> list[tuple[str, str]]:
        rows: list[tuple[str, str]] = []
        if backend in ("inprocess", "both"):
            rate, cpu, loop_cpu = await bench_inprocess(sagas)
            rows.append(("demo saga, in-process + SQLite",
                         f"{rate:8.0f} sagas/s  (CPU per saga: {cpu:.2f} ms, event loop "
                         f"{loop_cpu:.2f} ms: at most {1000 / loop_cpu:.0f}/s with a free core)"))
        if backend in ("rabbitmq", "both"):
            rate, cpu, loop_cpu = await bench_rabbitmq(sagas, amqp_url, pg_url)
            rows.append(("demo saga, RabbitMQ + PostgreSQL",
                         f"{rate:8.0f} sagas/s  (CPU per saga in this process: {cpu:.2f} ms, "
                         f"event loop {loop_cpu:.2f} ms)"))
            raw, raw_cpu = await bench_raw_aiopika(amqp_url, raw_messages)
            rows.append(("raw aio-pika persistent publish+consume",
                         f"{raw:8.0f} msgs/s  (= {raw / 6:.0f} six-message sagas/s; CPU per "
                         f"message {raw_cpu:.2f} ms, x6 = {6 * raw_cpu:.2f} ms)"))
        return rows

    click.echo(f"machine: {machine()}")
    click.echo(f"sagas per backend: {sagas} (three steps: reserve, charge, ship)")
    for name, value in asyncio.run(run()):
        click.echo(f"  {name:<42} {value}")
