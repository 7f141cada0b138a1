"""The statements every issuance runs, as driver SQL (``infra.db.fast``), and the conversion
of their typed columns.

SQLAlchemy Core builds each statement and processes each result row at ~50–100 µs of CPU,
more than SQLite's own work, and on PostgreSQL every statement is a round trip. So the
per-issuance statements are fixed SQL text, each read joined into one statement:
verification reads the card certificate, the nonce and the saga's application at once,
the state check the application, its card and the person's other phone certificates at
once, issuance the application, its card and the saga's certificates (for every saga of a
batch at once). Everything cold (statuses, CRL, OCSP, export, audit) stays SQLAlchemy Core.

Rows written here are read through Core and the other way round, so the ``DateTime``
columns go through SQLAlchemy's own bind and result processors for the dialect (SQLite:
text in SQLAlchemy's format; asyncpg: datetime objects as they are). No other column needs
converting: text, integers and bytes pass through both drivers unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from infra.db.fast import execute
from workers.ca import tables as t

# Verification: the card certificate named by its serial, the nonce's use if any and the
# saga's verified application if any. The one-row ``probe`` makes a row of NULLs of what
# is missing, so a refusal reads as much as an acceptance.
VERIFY_READ = (
    "SELECT card.holder, card.cert_type, card.person_id, card.status, card.not_before,"
    " card.not_after, card.der, used.saga_id, used.application_digest,"
    " a.person_id, a.se_cin, a.se_kdd, a.card_serial, a.cert_types, a.pin_option"
    " FROM (SELECT 1 AS one) probe"
    " LEFT JOIN ca_certificates card ON card.serial = ?"
    " LEFT JOIN ca_used_nonces used ON used.nonce = ?"
    " LEFT JOIN ca_applications a ON a.saga_id = ?"
)
# An accepted application consumes its nonce and is recorded: two inserts, whose
# parameters are those of ``INSERT_USED_NONCE`` then those of ``INSERT_APPLICATION``.
INSERT_USED_NONCE = (
    "INSERT INTO ca_used_nonces (nonce, saga_id, application_digest, used_at) VALUES (?, ?, ?, ?)"
)
INSERT_APPLICATION = (
    "INSERT INTO ca_applications (saga_id, person_id, se_cin, se_kdd, card_serial, cert_types,"
    " pin_option, application_digest, verified_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# PostgreSQL runs both in one statement (one round trip; SQLite has no INSERT inside WITH).
# A unique key broken by either still raises IntegrityError.
INSERT_USED_NONCE_AND_APPLICATION = f"WITH used AS ({INSERT_USED_NONCE}) {INSERT_APPLICATION}"

# State check: the saga's application, its card certificate, and the person's phone
# certificates not revoked that other sagas issued (one row each; NULLs when none). The
# join on the person uses ``ix_ca_certificates_person``.
STATE_CHECK_READ = (
    "SELECT a.person_id, a.se_cin, a.se_kdd, a.card_serial, a.cert_types, a.pin_option,"
    " card.status, card.not_after,"
    " other.serial, other.cert_type, other.se_cin, other.status, other.not_after"
    " FROM ca_applications a"
    " LEFT JOIN ca_certificates card ON card.serial = a.card_serial"
    " LEFT JOIN ca_certificates other ON other.person_id = a.person_id AND other.holder = ?"
    " AND other.status <> ? AND (other.saga_id IS NULL OR other.saga_id <> a.saga_id)"
    " WHERE a.saga_id = ?"
)

# Issuance: the application, its card certificate and any certificate the saga already
# has, for every saga of a batch at once (append ``fast.in_list``); every join is an
# equality on an indexed column.
ISSUE_READ = (
    "SELECT a.saga_id, a.person_id, a.se_cin, a.se_kdd, a.card_serial, a.cert_types,"
    " a.pin_option, card.status, card.not_after, card.der,"
    " own.cert_type, own.serial, own.ca_kind, own.ca_generation, own.der"
    " FROM ca_applications a"
    " LEFT JOIN ca_certificates card ON card.serial = a.card_serial"
    " LEFT JOIN ca_certificates own ON own.saga_id = a.saga_id"
    " WHERE a.saga_id IN "
)
CERTIFICATE_COLUMNS = tuple(column.name for column in t.certificates.columns)
INSERT_CERTIFICATE = (
    f"INSERT INTO ca_certificates ({', '.join(CERTIFICATE_COLUMNS)})"  # noqa: S608 - fixed names
    f" VALUES ({', '.join('?' * len(CERTIFICATE_COLUMNS))})"
)
_CERTIFICATE_TIMES = frozenset(
    column.name for column in t.certificates.columns if isinstance(column.type, DateTime)
)


@dataclass(frozen=True, slots=True)
class TimeColumns:
    """How one dialect's driver takes and gives our ``DateTime(timezone=True)`` columns, as
    SQLAlchemy Core does: ``write`` a UTC datetime as the parameter, ``read`` a stored value
    back as a timezone-aware UTC datetime (what the CA's Core reads make of it too)."""

    write: Callable[[datetime], Any]
    read: Callable[[Any], datetime]


_TIME_COLUMNS: dict[str, TimeColumns] = {}


def time_columns(dialect: Dialect) -> TimeColumns:
    columns = _TIME_COLUMNS.get(dialect.name)
    if columns is None:
        columns = _TIME_COLUMNS[dialect.name] = _time_columns(dialect)
    return columns


def utc(moment: datetime) -> datetime:
    """A time the CA stored, as it was stored: SQLite hands back naive datetimes for
    DateTime(timezone=True), and every time the CA stores is UTC."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _time_columns(dialect: Dialect) -> TimeColumns:
    # every DateTime(timezone=True) column of the CA's tables has the same processors
    implementation = t.certificates.c.not_after.type.dialect_impl(dialect)
    bind = implementation.bind_processor(dialect)
    result = implementation.result_processor(dialect, None)

    def read(value: Any) -> datetime:
        return utc(result(value) if result is not None else value)

    # an issuance writes the same few times for both its certificates: format each once
    write = functools.lru_cache(maxsize=256)(bind) if bind is not None else _unchanged
    return TimeColumns(write=write, read=read)


def _unchanged(value: Any) -> Any:
    return value


async def record_application(
    conn: AsyncConnection, used_nonce: tuple[Any, ...], application: tuple[Any, ...]
) -> None:
    """Consume the nonce and record the verified application (rows in the columns' order)."""
    if conn.dialect.name == "postgresql":
        await execute(conn, INSERT_USED_NONCE_AND_APPLICATION, used_nonce + application)
        return
    await execute(conn, INSERT_USED_NONCE, used_nonce)
    await execute(conn, INSERT_APPLICATION, application)


def certificate_row(dialect: Dialect, **values: Any) -> tuple[Any, ...]:
    """``values`` (every certificate column) as ``INSERT_CERTIFICATE``'s parameters."""
    write = time_columns(dialect).write
    return tuple(
        write(values[name])
        if name in _CERTIFICATE_TIMES and values[name] is not None
        else values[name]
        for name in CERTIFICATE_COLUMNS
    )
