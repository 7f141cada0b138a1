"""``jpki gateway``: run one MQTT <-> AMQP gateway (run several for availability)."""

from __future__ import annotations

import asyncio
import signal

import click

from infra import eventloop
from infra.logging import configure_logging
from infra.metrics import start_metrics_server
from infra.mqtt import TOPIC_ROOT


async def _serve(amqp_url: str, mqtt_url: str, name: str | None, topic_root: str) -> None:
    from infra.transport.rabbitmq import RabbitMQTransport
    from workers.gateway.service import run_gateway

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    transport = RabbitMQTransport(amqp_url, connection_name=f"jpki-gateway-{name or ''}")
    await transport.connect()
    try:
        await run_gateway(transport, mqtt_url, name=name, topic_root=topic_root, stop=stop)
    finally:
        await transport.close()


@click.command("gateway")
@click.option("--amqp-url", envvar="JPKI_AMQP_URL", required=True, help="env JPKI_AMQP_URL")
@click.option("--mqtt-url", envvar="JPKI_MQTT_URL", required=True, help="env JPKI_MQTT_URL")
@click.option("--name", default=None, help="stable gateway name (its MQTT session id)")
@click.option("--topic-root", envvar="JPKI_TOPIC_ROOT", default=TOPIC_ROOT, show_default=True,
              help="env JPKI_TOPIC_ROOT; the fleet's --topic-root (runs apart on one broker)")
@click.option("--metrics-port", type=int, default=None, help="serve /metrics on this port")
@click.option("--log-level", default="INFO", show_default=True)
def gateway_command(
    amqp_url: str,
    mqtt_url: str,
    name: str | None,
    topic_root: str,
    metrics_port: int | None,
    log_level: str,
) -> None:
    """Bridge the phones' MQTT topics and the AMQP bus."""
    configure_logging("gateway", level=log_level)
    if metrics_port is not None:
        start_metrics_server(metrics_port)
    eventloop.run(_serve(amqp_url, mqtt_url, name, topic_root))
