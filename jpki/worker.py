"""``jpki worker tsm|ca``: the SP-TSM and CA workers as their own processes on RabbitMQ
(and PostgreSQL), reading the same data directory (key files, local secrets) as ``jpki run``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from infra.heap import freeze_start_up_objects
from infra.logging import configure_logging
from jpki.run import local_secret, run_until_signal

data_dir_option = click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("data"),
    show_default=True, help="key files and local secrets; SQLite stores unless --db-url",
)
amqp_option = click.option("--amqp-url", envvar="JPKI_AMQP_URL", required=True,
                           help="RabbitMQ URL (env JPKI_AMQP_URL)")
db_option = click.option("--db-url", envvar="JPKI_DB_URL", default=None,
                         help="PostgreSQL URL (env JPKI_DB_URL); default SQLite in --data-dir")


@click.group("worker")
def worker() -> None:
    """The back-end workers, one process each."""


@worker.command("ca")
@data_dir_option
@amqp_option
@db_option
@click.option("--log-level", default="INFO", show_default=True)
def ca_worker_command(data_dir: Path, amqp_url: str, db_url: str | None, log_level: str) -> None:
    """The JPKI CA worker: the ``ca`` queue (verify, state check, issue, revoke)."""
    configure_logging("ca", level=log_level)
    from infra.transport.rabbitmq import RabbitMQTransport
    from workers.ca.authority import CertificateAuthority
    from workers.ca.keystore import Passphrase
    from workers.ca.service import CaWorker

    async def serve() -> None:
        passphrase = Passphrase(local_secret(data_dir, "ca", "JPKI_CA_PASSPHRASE"))
        authority = await CertificateAuthority.open(data_dir, passphrase, db_url=db_url)
        transport = RabbitMQTransport(amqp_url, connection_name="ca")
        await transport.connect()
        ca = CaWorker(authority, transport)
        try:
            await ca.start()
            freeze_start_up_objects()
            await asyncio.Event().wait()
        finally:
            await ca.stop()
            await transport.close()
            await authority.close()

    run_until_signal(serve())


@worker.command("tsm")
@data_dir_option
@amqp_option
@db_option
@click.option("--log-level", default="INFO", show_default=True)
def tsm_worker_command(data_dir: Path, amqp_url: str, db_url: str | None, log_level: str) -> None:
    """The SP-TSM worker: the ``tsm`` queue (inspect, clean up, install, keys, certificates,
    temporary PINs, release, wipe), reaching each SE over its phone's link."""
    from infra.db import Database
    from infra.transport.rabbitmq import RabbitMQTransport
    from jpki.run import tsm_key_ring
    from workers.tsm.service import TsmWorker

    configure_logging("tsm", level=log_level)

    async def serve() -> None:
        ring = tsm_key_ring(data_dir)
        db = Database.for_service("tsm", url=db_url, data_dir=data_dir)
        transport = RabbitMQTransport(amqp_url, connection_name="tsm")
        await transport.connect()
        tsm = TsmWorker(db, transport, ring)
        try:
            await tsm.start()
            freeze_start_up_objects()
            await asyncio.Event().wait()
        finally:
            await tsm.stop()
            await transport.close()
            await db.close()

    run_until_signal(serve())
