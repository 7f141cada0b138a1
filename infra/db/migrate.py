"""Alembic, one migration history per service, run programmatically (SQLite and PostgreSQL).

Each service keeps its migrations beside its code (``orchestrator/migrations``,
``workers/ca/migrations``, ...): a folder with ``env.py`` (two lines, calling
``run_migrations_from_env``), ``script.py.mako`` and ``versions/``. Its version table is
``alembic_version_<service>``, so two services could even share a schema without
sharing a history.

    await upgrade(db, "orchestrator")            # to head, inside the process at start-up
    python -m infra.db upgrade ca --url postgresql+asyncpg://...
    python -m infra.db revision ca -m "certificates table"
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from typing import Any

import click
from alembic import command, context
from alembic.config import Config

from infra.db.database import Database, DatabaseConfigError

# service name → package holding its migrations
MIGRATIONS: dict[str, str] = {
    "orchestrator": "orchestrator.migrations",
    "demo_participant": "orchestrator.demo.migrations",
    "ca": "workers.ca.migrations",
    "tsm": "workers.tsm.migrations",
}


def migrations_dir(service: str) -> Path:
    package = MIGRATIONS.get(service)
    if package is None:
        raise DatabaseConfigError(f"no migration history registered for service {service!r}")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatabaseConfigError(f"migration package {package} of {service!r} is missing")
    return Path(next(iter(spec.submodule_search_locations)))


def _config(service: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir(service)))
    cfg.attributes["service"] = service
    return cfg


async def upgrade(db: Database | str, service: str, *, revision: str = "head") -> None:
    """Bring ``service``'s tables to ``revision`` (creating the PostgreSQL schema first)."""
    owned = isinstance(db, str)
    database = Database.for_service(service, url=db) if isinstance(db, str) else db
    try:
        await database.ensure_schema()
        cfg = _config(service)

        def run(sync_connection: Any) -> None:
            cfg.attributes["connection"] = sync_connection
            command.upgrade(cfg, revision)

        async with database.transaction() as conn:
            await conn.run_sync(run)
    finally:
        if owned:
            await database.close()


def run_migrations_from_env() -> None:
    """The body of every service's ``env.py``: migrate on the connection we were given."""
    config = context.config
    connection = config.attributes.get("connection")
    if connection is None:
        raise DatabaseConfigError("migrations run only through infra.db.migrate.upgrade")
    service = config.attributes["service"]
    context.configure(
        connection=connection,
        target_metadata=None,
        version_table=f"alembic_version_{service}",
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters by copy
    )
    with context.begin_transaction():
        context.run_migrations()


@click.group()
def cli() -> None:
    """Database migrations, one history per service."""


@cli.command("upgrade")
@click.argument("service")
@click.option("--url", default=None, help="PostgreSQL URL (default: SQLite in --data-dir)")
@click.option("--data-dir", default="data", show_default=True)
@click.option("--schema", default=None, help="PostgreSQL schema (default: the service name)")
@click.option("--revision", default="head", show_default=True)
def upgrade_command(
    service: str, url: str | None, data_dir: str, schema: str | None, revision: str
) -> None:
    try:
        migrations_dir(service)
    except DatabaseConfigError as exc:
        raise click.ClickException(str(exc)) from None
    db = Database.for_service(service, url=url, data_dir=data_dir, schema=schema)

    async def go() -> None:
        try:
            await upgrade(db, service, revision=revision)
        finally:
            await db.close()

    asyncio.run(go())
    click.echo(f"{service}: upgraded to {revision}")


@cli.command("revision")
@click.argument("service")
@click.option("-m", "--message", required=True)
def revision_command(service: str, message: str) -> None:
    """Write a new empty migration into the service's ``versions/``."""
    try:
        command.revision(_config(service), message=message)
    except DatabaseConfigError as exc:
        raise click.ClickException(str(exc)) from None
