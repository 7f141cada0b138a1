"""``jpki bench transport``: message rates of the transports, measured in one run.

- in-process, raw: publish + consume + ack of small messages on the embedded transport;
- in-process, bus: the same through the typed bus (envelope build, encode, decode, metrics,
  log context), the path every service message takes;
- RabbitMQ: persistent publishes into a quorum queue with publisher confirms (batches in
  flight at once), then consume + ack of all of them, then both at once in one process.

Each RabbitMQ run uses its own exchanges and queue and deletes them afterwards.
"""

from __future__ import annotations

import asyncio
import os
import platform
import time
import uuid

import click
import msgspec

from infra.bus import Bus
from infra.transport.base import Delivery, Outgoing, Transport
from infra.transport.inprocess import InProcessTransport
from protocol.envelope import Message, build, message_type

BODY = b'{"apdu":"' + b"00A4040007A0000002480400" * 10 + b'"}'  # ~250 bytes, a script's size


@message_type("bench.cmd.transport_probe", 1)
class Probe(msgspec.Struct, frozen=True):
    n: int


async def _drain(transport: Transport, queue: str, count: int, prefetch: int) -> float:
    """Consume and ack ``count`` messages; returns the seconds it took."""
    done = asyncio.Event()
    seen = 0

    async def ack(delivery: Delivery) -> None:
        nonlocal seen
        await delivery.ack()
        seen += 1
        if seen == count:
            done.set()

    started = time.perf_counter()
    subscription = await transport.consume(queue, ack, prefetch=prefetch)
    await done.wait()
    elapsed = time.perf_counter() - started
    await subscription.cancel()
    return elapsed


async def _publish(transport: Transport, count: int, batch: int, tag: str) -> float:
    started = time.perf_counter()
    for start in range(0, count, batch):
        await transport.publish(
            [
                Outgoing("bench.work", BODY, f"{tag}-{n}")
                for n in range(start, min(count, start + batch))
            ]
        )
    return time.perf_counter() - started


async def bench_inprocess(count: int) -> dict[str, float]:
    transport = InProcessTransport()
    await transport.connect()
    await transport.declare_queue("bench", ["bench.#"])
    draining = asyncio.create_task(_drain(transport, "bench", count, 256))
    started = time.perf_counter()
    await _publish(transport, count, 100, "raw")
    await draining
    raw = count / (time.perf_counter() - started)

    bus = Bus(transport)
    done = asyncio.Event()
    seen = 0

    async def handle(message: Message) -> None:
        nonlocal seen
        seen += 1
        if seen == count:
            done.set()

    await transport.declare_queue("bench.bus", ["bench.cmd.#"])
    subscription = await bus.subscribe("bench.bus", handle, prefetch=256)
    started = time.perf_counter()
    for start in range(0, count, 100):
        await bus.publish(*(build(Probe(n)) for n in range(start, min(count, start + 100))))
    await done.wait()
    typed = count / (time.perf_counter() - started)
    await subscription.cancel()
    await transport.close()
    return {"raw": raw, "bus": typed}


async def bench_rabbitmq(amqp_url: str, count: int, batch: int) -> dict[str, float]:
    from infra.transport.rabbitmq import RabbitMQTransport

    tag = uuid.uuid4().hex[:8]
    transport = RabbitMQTransport(
        amqp_url,
        exchange=f"jpki.bench.{tag}",
        dead_letter_exchange=f"jpki.bench.{tag}.dlx",
        connection_name="jpki-bench",
    )
    await transport.connect()
    queue = f"bench-{tag}"
    try:
        await transport.declare_queue(queue, ["bench.#"])
        publish = count / await _publish(transport, count, batch, "p")
        consume = count / await _drain(transport, queue, count, 512)
        draining = asyncio.create_task(_drain(transport, queue, count, 512))
        started = time.perf_counter()
        await _publish(transport, count, batch, "b")
        await draining
        both = count / (time.perf_counter() - started)
    finally:
        await transport.delete_topology()
        await transport.close()
    return {"publish": publish, "consume": consume, "both": both}


@click.command("transport")
@click.option(
    "--backend",
    type=click.Choice(["inprocess", "rabbitmq", "both"]),
    default="both",
    show_default=True,
)
@click.option("--messages", "count", default=20_000, show_default=True)
@click.option("--batch", default=500, show_default=True, help="publishes in flight at once")
@click.option(
    "--amqp-url",
    envvar="JPKI_AMQP_URL",
    default="amqp://guest:guest@127.0.0.1:5672/",
    show_default=True,
)
def transport_bench(backend: str, count: int, batch: int, amqp_url: str) -> None:
    """Messages per second on the in-process transport and on RabbitMQ with confirms."""
    click.echo(
        f"machine: {platform.machine()} python {platform.python_version()} "
        f"cpus {os.cpu_count()} load {os.getloadavg()[0]:.2f}; {count} messages "
        f"of {len(BODY)} bytes"
    )
    if backend in ("inprocess", "both"):
        rates = asyncio.run(bench_inprocess(count))
        click.echo(f"in-process raw   publish+consume+ack   {rates['raw']:>10,.0f} msg/s")
        click.echo(f"in-process bus   typed publish+handle  {rates['bus']:>10,.0f} msg/s")
    if backend in ("rabbitmq", "both"):
        rates = asyncio.run(bench_rabbitmq(amqp_url, count, batch))
        click.echo(f"RabbitMQ publish persistent+confirmed  {rates['publish']:>10,.0f} msg/s")
        click.echo(f"RabbitMQ consume+ack                   {rates['consume']:>10,.0f} msg/s")
        click.echo(f"RabbitMQ publish and consume at once   {rates['both']:>10,.0f} msg/s")
