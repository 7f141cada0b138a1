"""``jpki ops``: what operators do with queues — see depths, list and replay parked messages.

Other operator commands (sagas, batches) attach to the same ``ops`` group.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import aio_pika
import click
import msgspec

from infra.bus import GATEWAY_QUEUE, SERVICE_QUEUES
from infra.logging import configure_logging
from infra.mqtt import phone_password, read_phone_secret
from infra.transport.base import DEFAULT_DELIVERY_LIMIT, Parked, TransportError
from infra.transport.definitions import broker_users, definitions_json, topology_definitions
from infra.transport.rabbitmq import RabbitMQTransport

T = TypeVar("T")


class _TypeOnly(msgspec.Struct):
    type: str = "?"


_type_decoder = msgspec.json.Decoder(_TypeOnly)


def message_type_of(body: bytes) -> str:
    """The envelope type, or ``?`` for a body that is not an envelope at all."""
    try:
        return _type_decoder.decode(body).type
    except msgspec.DecodeError:
        return "?"


amqp_url_option = click.option(
    "--amqp-url",
    envvar="JPKI_AMQP_URL",
    default="amqp://guest:guest@127.0.0.1:5672/",
    show_default=True,
    help="RabbitMQ URL (env JPKI_AMQP_URL)",
)
exchange_option = click.option(
    "--exchange", default="jpki", show_default=True, help="topic exchange of the deployment"
)
dlx_option = click.option(
    "--dead-letter-exchange",
    default="jpki.dlx",
    show_default=True,
    help="dead-letter exchange of the deployment",
)


def _with_transport(
    amqp_url: str,
    exchange: str,
    dead_letter_exchange: str,
    work: Callable[[RabbitMQTransport], Awaitable[T]],
) -> T:
    async def run() -> T:
        transport = RabbitMQTransport(
            amqp_url,
            exchange=exchange,
            dead_letter_exchange=dead_letter_exchange,
            connection_name="jpki-ops",
        )
        await transport.connect()
        try:
            return await work(transport)
        finally:
            await transport.close()

    try:
        return asyncio.run(run())
    except TransportError as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def ops() -> None:
    """Operator commands."""
    # the answer goes to stdout, warnings (a slow broker) to stderr: scripts read stdout
    configure_logging("ops", level="WARNING")


@ops.group()
def parked() -> None:
    """Messages in a queue's parking lot: why they are there, and sending them back."""


def _row(item: Parked) -> dict[str, str]:
    return {
        "message_id": item.message_id or "-",
        "type": message_type_of(item.body),
        "routing_key": item.routing_key,
        "parked_at": datetime.fromtimestamp(item.parked_at, UTC).isoformat(timespec="seconds"),
        "reason": item.reason,
    }


@parked.command("list")
@click.option("--queue", "-q", required=True, help="the service queue (not its .parking)")
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="one JSON object a line")
@amqp_url_option
@exchange_option
@dlx_option
def list_parked(
    queue: str,
    limit: int,
    as_json: bool,
    amqp_url: str,
    exchange: str,
    dead_letter_exchange: str,
) -> None:
    """List parked messages: message id, type, when, and the reason."""
    items = _with_transport(
        amqp_url, exchange, dead_letter_exchange, lambda t: t.parked(queue, limit)
    )
    rows = [_row(item) for item in items]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    if not rows:
        click.echo(f"no parked messages for {queue}")
        return
    click.echo("MESSAGE ID                        TYPE                          PARKED AT  REASON")
    for row in rows:
        click.echo(f"{row['message_id']:<33} {row['type']:<29} {row['parked_at']} {row['reason']}")
    click.echo(f"{len(rows)} parked message(s) in {queue}")


@parked.command("replay")
@click.option("--queue", "-q", required=True)
@click.option("--id", "message_ids", multiple=True, help="replay only these (repeatable)")
@amqp_url_option
@exchange_option
@dlx_option
def replay_parked(
    queue: str,
    message_ids: tuple[str, ...],
    amqp_url: str,
    exchange: str,
    dead_letter_exchange: str,
) -> None:
    """Send parked messages back to their queue (all of them, or those given by --id)."""
    moved = _with_transport(
        amqp_url,
        exchange,
        dead_letter_exchange,
        lambda t: t.replay_parked(queue, list(message_ids) or None),
    )
    click.echo(f"replayed {moved} message(s) to {queue}")


@ops.command("queues")
@click.option("--queue", "-q", "queues", multiple=True, help="default: the service queues")
@amqp_url_option
@exchange_option
@dlx_option
def queue_depths(
    queues: tuple[str, ...], amqp_url: str, exchange: str, dead_letter_exchange: str
) -> None:
    """Ready messages per queue and per parking lot."""
    names = list(queues) or [*SERVICE_QUEUES, GATEWAY_QUEUE]

    async def depths(transport: RabbitMQTransport) -> dict[str, str]:
        found: dict[str, str] = {}
        for name in names:
            try:
                found.update({k: str(v) for k, v in (await transport.depths_of([name])).items()})
            except TransportError:
                found[name] = "not declared"
        return found

    for name, depth in _with_transport(amqp_url, exchange, dead_letter_exchange, depths).items():
        click.echo(f"{name:<40} {depth}")


@ops.command("topology")
@click.option("--definitions", "as_definitions", is_flag=True, required=True,
              help="print the RabbitMQ definitions (the broker's import format)")
@click.option("--delivery-limit", type=int, default=DEFAULT_DELIVERY_LIMIT, show_default=True)
@click.option("--vhost", default="/", show_default=True)
@exchange_option
@dlx_option
def topology(
    as_definitions: bool, delivery_limit: int, vhost: str, exchange: str, dead_letter_exchange: str
) -> None:
    """The deployment's exchanges, quorum queues, parking lots and bindings, exactly as
    the services declare them (deploy/rabbitmq/definitions.json is this output)."""
    definitions = topology_definitions(
        exchange=exchange,
        dead_letter_exchange=dead_letter_exchange,
        delivery_limit=delivery_limit,
        vhost=vhost,
    )
    click.echo(definitions_json(definitions), nl=False)


def _secret_line(path: Path) -> str:
    try:
        value = path.read_text().strip()
    except OSError:
        raise click.ClickException(f"cannot read {path.name}") from None
    if not value or "\n" in value or ":" in value:
        raise click.ClickException(f"{path.name} must hold one line without ':'")
    return value


def _write_private(out: Path, text: str) -> None:
    """Create ``out`` readable by its owner only (it holds passwords or their hashes)."""
    out.unlink(missing_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


@ops.command("broker-users")
@click.option("--user", "users", multiple=True, required=True, metavar="NAME=PASSWORD_FILE",
              help="a broker user and the file holding its password (repeatable)")
@click.option("--vhost", default="/", show_default=True)
@click.option("--administrator", is_flag=True, help="tag the users 'administrator'")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def broker_users_command(
    users: tuple[str, ...], vhost: str, administrator: bool, out: Path
) -> None:
    """Write RabbitMQ user definitions (salted SHA-256 hashes) for import at boot."""
    pairs = []
    for item in users:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise click.BadParameter("expected NAME=PASSWORD_FILE", param_hint="--user")
        pairs.append((name, _secret_line(Path(file))))
    tags = ("administrator",) if administrator else ()
    _write_private(out, json.dumps(broker_users(pairs, vhost=vhost, tags=tags), indent=2) + "\n")
    click.echo(f"wrote {len(pairs)} user(s) to {out}")


@ops.command("mqtt-passwords")
@click.option("--phones", type=int, required=True, help="phones device-prefix-00000 onwards")
@click.option("--device-prefix", default="phone", show_default=True)
@click.option("--phone-secret-file", type=click.Path(dir_okay=False, path_type=Path),
              required=True, help="the provisioning secret the phones derive passwords from")
@click.option("--gateway-user", default="jpki-gateway", show_default=True)
@click.option("--gateway-password-file", type=click.Path(dir_okay=False, path_type=Path),
              required=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def mqtt_passwords(
    phones: int,
    device_prefix: str,
    phone_secret_file: Path,
    gateway_user: str,
    gateway_password_file: Path,
    out: Path,
) -> None:
    """Write a plain-text Mosquitto password file (user:password a line) for the gateway
    and the phones; hash it in place with ``mosquitto_passwd -U`` before use."""
    try:
        secret = read_phone_secret(phone_secret_file)
    except TransportError as exc:
        raise click.ClickException(str(exc)) from None
    lines = [f"{gateway_user}:{_secret_line(gateway_password_file)}"]
    for index in range(phones):
        device_id = f"{device_prefix}-{index:05d}"
        lines.append(f"{device_id}:{phone_password(secret, device_id)}")
    _write_private(out, "\n".join(lines) + "\n")
    click.echo(f"wrote {len(lines)} user(s) to {out}")


@ops.command("consumers")
@click.option("--queue", "-q", required=True)
@click.option("--at-least", type=int, default=1, show_default=True)
@amqp_url_option
def consumers(queue: str, at_least: int, amqp_url: str) -> None:
    """Exit 0 if ``queue`` has at least N consumers (a container health check)."""

    async def count() -> int:
        try:
            connection = await aio_pika.connect(amqp_url, timeout=5)
        except (OSError, aio_pika.exceptions.AMQPException) as exc:
            raise click.ClickException(f"RabbitMQ not reachable: {type(exc).__name__}") from None
        try:
            channel = await connection.channel()
            try:
                declared = await channel.declare_queue(queue, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                raise click.ClickException(f"queue {queue} is not declared") from None
            return int(declared.declaration_result.consumer_count)
        finally:
            await connection.close()

    found = asyncio.run(count())
    click.echo(f"{queue}: {found} consumer(s)")
    if found < at_least:
        raise SystemExit(1)
