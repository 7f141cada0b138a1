"""``jpki bench transport``: message rates of the transports, measured in one run.

- in-process, raw: publish + consume + ack of small messages on the embedded transport;
- in-process, bus: the same through the typed bus (envelope build, encode, decode, metrics,
  log context), the path every service message takes;
- RabbitMQ: persistent publishes into a quorum queue with publisher confirms (batches in
  flight at once), then consume + ack of all of them, then both at once in one process.

Next to each rate: this process's CPU time per message (user + system), which the load
of a shared machine changes far less than the rate.

Each RabbitMQ run uses its own exchanges and queue and deletes them afterwards.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import click
import msgspec

from infra.bus import Bus
from infra.transport.base import Delivery, Outgoing, Transport
from infra.transport.inprocess import InProcessTransport
from jpki.bench.machine import machine
from protocol.envelope import Message, build, message_type

BODY = b'{"apdu":"' + b"00A4040007A0000002480400" * 10 + b'"}'  # ~250 bytes, a script's size


@message_type("bench.cmd.transport_probe", 1)
class Probe(msgspec.Struct, frozen=True):
    n: int


class Measured:
    """Messages per second and this process's CPU microseconds per message of a phase."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._wall = time.perf_counter()
        self._cpu = time.process_time()
        self.rate = 0.0
        self.cpu_us = 0.0

    def stop(self) -> Measured:
        self.rate = self.count / (time.perf_counter() - self._wall)
        self.cpu_us = 1e6 * (time.process_time() - self._cpu) / self.count
        return self

    def __str__(self) -> str:
        return f"{self.rate:>10,.0f} msg/s {self.cpu_us:>8,.1f} µs CPU/msg"


async def _drain(transport: Transport, queue: str, count: int, prefetch: int) -> None:
    """Consume and ack ``count`` messages."""
    done = asyncio.Event()
    seen = 0

    async def ack(delivery: Delivery) -> None:
        nonlocal seen
        await delivery.ack()
        seen += 1
        if seen == count:
            done.set()

    subscription = await transport.consume(queue, ack, prefetch=prefetch)
    await done.wait()
    await subscription.cancel()


async def _publish(transport: Transport, count: int, batch: int, tag: str) -> None:
    for start in range(0, count, batch):
        await transport.publish(
            [
                Outgoing("bench.work", BODY, f"{tag}-{n}")
                for n in range(start, min(count, start + batch))
            ]
        )


async def bench_inprocess(count: int) -> dict[str, Measured]:
    transport = InProcessTransport()
    await transport.connect()
    await transport.declare_queue("bench", ["bench.#"])
    raw = Measured(count)
    draining = asyncio.create_task(_drain(transport, "bench", count, 256))
    await _publish(transport, count, 100, "raw")
    await draining
    raw.stop()

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
    typed = Measured(count)
    for start in range(0, count, 100):
        await bus.publish(*(build(Probe(n)) for n in range(start, min(count, start + 100))))
    await done.wait()
    typed.stop()
    await subscription.cancel()
    await transport.close()
    return {"raw": raw, "bus": typed}


async def bench_rabbitmq(amqp_url: str, count: int, batch: int) -> dict[str, Measured]:
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
        publish = Measured(count)
        await _publish(transport, count, batch, "p")
        publish.stop()
        consume = Measured(count)
        await _drain(transport, queue, count, 512)
        consume.stop()
        both = Measured(count)
        draining = asyncio.create_task(_drain(transport, queue, count, 512))
        await _publish(transport, count, batch, "b")
        await draining
        both.stop()
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
        f"machine: {machine()}; {count} messages "
        f"of {len(BODY)} bytes"
    )
    if backend in ("inprocess", "both"):
        rates = asyncio.run(bench_inprocess(count))
        click.echo(f"in-process raw   publish+consume+ack   {rates['raw']}")
        click.echo(f"in-process bus   typed publish+handle  {rates['bus']}")
    if backend in ("rabbitmq", "both"):
        rates = asyncio.run(bench_rabbitmq(amqp_url, count, batch))
        click.echo(f"RabbitMQ publish persistent+confirmed  {rates['publish']}")
        click.echo(f"RabbitMQ consume+ack                   {rates['consume']}")
        click.echo(f"RabbitMQ publish and consume at once   {rates['both']}")
