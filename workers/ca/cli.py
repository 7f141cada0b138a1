"""``jpki ca ...`` and ``jpki ocsp serve``: the CA's operator commands.

The CA key passphrase comes from ``JPKI_CA_PASSPHRASE`` or ``JPKI_CA_PASSPHRASE_FILE``, or
else from ``<data dir>/secrets/ca.passphrase``, where ``jpki run`` keeps the one it made, so
that a run's data directory can be inspected as it is. It is never an option (it would show
in the process list and the shell history).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import click

from infra import eventloop
from infra.heap import freeze_start_up_objects
from workers.ca.authority import CertificateAuthority
from workers.ca.errors import CaKeyUnavailable
from workers.ca.keystore import Passphrase
from workers.ca.profiles import CaKind

data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="CA key files and, unless --db-url, its SQLite store",
)
db_url_option = click.option(
    "--db-url",
    envvar="JPKI_DB_URL",
    default=None,
    help="PostgreSQL URL (tables in schema 'ca'); default SQLite",
)


def _passphrase(data_dir: Path) -> Passphrase:
    try:
        return Passphrase.from_environment()
    except CaKeyUnavailable as exc:
        local = data_dir / "secrets" / "ca.passphrase"
        if local.is_file():
            return Passphrase(local.read_bytes().strip())
        raise click.ClickException(f"{exc} (or run on a data directory made by jpki run)") from None


async def _open(data_dir: Path, db_url: str | None) -> CertificateAuthority:
    return await CertificateAuthority.open(data_dir, _passphrase(data_dir), db_url=db_url)


@click.group("ca")
def ca_cli() -> None:
    """The JPKI CAs: keys, rollover, export."""


@ca_cli.command("init")
@data_dir_option
@db_url_option
def init_command(data_dir: Path, db_url: str | None) -> None:
    """Create the store and generation 1 of both CAs (no-op if they exist)."""

    async def go() -> None:
        ca = await _open(data_dir, db_url)
        try:
            for issuer in ca.generations():
                click.echo(
                    f"{issuer.kind.value} CA generation {issuer.generation}: "
                    f"key id {issuer.key_id.hex()}"
                )
        finally:
            await ca.close()

    asyncio.run(go())


@ca_cli.command("rollover")
@data_dir_option
@db_url_option
@click.option("--kind", type=click.Choice([k.value for k in CaKind]), required=True)
def rollover_command(data_dir: Path, db_url: str | None, kind: str) -> None:
    """A new key generation for one CA, same name; it signs from now on."""

    async def go() -> None:
        ca = await _open(data_dir, db_url)
        try:
            issuer = await ca.rollover(CaKind(kind))
            click.echo(f"{kind} CA generation {issuer.generation}: key id {issuer.key_id.hex()}")
        finally:
            await ca.close()

    asyncio.run(go())


@ca_cli.command("export")
@data_dir_option
@db_url_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def export_command(data_dir: Path, db_url: str | None, out: Path) -> None:
    """Write every CA certificate, the current CRLs, every issued certificate and index.tsv."""

    async def go() -> None:
        ca = await _open(data_dir, db_url)
        try:
            counts = await ca.export(out)
        finally:
            await ca.close()
        click.echo(
            f"exported {counts['ca']} CA certificates, {counts['crl']} CRLs and "
            f"{counts['certificates']} certificates to {out}"
        )

    asyncio.run(go())


@click.group("ocsp")
def ocsp_cli() -> None:
    """The OCSP responder (and CRLs) over HTTP."""


@ocsp_cli.command("serve")
@data_dir_option
@db_url_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
def serve_command(data_dir: Path, db_url: str | None, host: str, port: int) -> None:
    """Serve OCSP (POST / or GET /ocsp/...) and CRLs (GET /crl/<kind>[-g<N>].crl)."""
    from workers.ca.http import serve

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):  # a clean stop, exit status 0
            loop.add_signal_handler(signum, stop.set)
        ca = await _open(data_dir, db_url)
        runner = await serve(ca, host, port)
        freeze_start_up_objects()
        click.echo(f"OCSP responder on http://{host}:{port}/", err=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
            await ca.close()

    eventloop.run(go())
