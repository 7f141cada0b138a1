"""Outbox, inbox and the CA's tables: generations, persons, certificates, nonces, applications.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from infra.db.messaging import create_messaging_tables, drop_messaging_tables

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    create_messaging_tables()
    op.create_table(
        "ca_generations",
        sa.Column("kind", sa.String(8), primary_key=True),
        sa.Column("generation", sa.Integer, primary_key=True),
        sa.Column("key_id", sa.String(64), nullable=False, unique=True),
        sa.Column("certificate", sa.LargeBinary, nullable=False),
        sa.Column("key_file", sa.String(255), nullable=False),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("created_at", _WHEN, nullable=False),
        sa.Column("crl_number", sa.Integer, nullable=False),
        sa.Column("crl_dirty", sa.Boolean, nullable=False),
        sa.Column("crl", sa.LargeBinary, nullable=True),
    )
    op.create_table(
        "ca_persons",
        sa.Column("person_id", sa.String(64), primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("date_of_birth", sa.Date, nullable=False),
        sa.Column("sex", sa.String(1), nullable=False),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("prefecture", sa.Text, nullable=False),
        sa.Column("city", sa.Text, nullable=False),
        sa.Column("created_at", _WHEN, nullable=False),
    )
    op.create_table(
        "ca_certificates",
        sa.Column("serial", sa.String(40), primary_key=True),
        sa.Column("ca_kind", sa.String(8), nullable=False),
        sa.Column("ca_generation", sa.Integer, nullable=False),
        sa.Column("holder", sa.String(8), nullable=False),
        sa.Column("cert_type", sa.String(8), nullable=False),
        sa.Column("person_id", sa.String(64), nullable=False),
        sa.Column("se_cin", sa.String(64), nullable=True),
        sa.Column("card_serial", sa.String(40), nullable=True),
        sa.Column("saga_id", sa.String(64), nullable=True),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("reason", sa.String(32), nullable=True),
        sa.Column("cause", sa.String(32), nullable=True),
        sa.Column("status_changed_at", _WHEN, nullable=True),
        sa.Column("not_before", _WHEN, nullable=False),
        sa.Column("not_after", _WHEN, nullable=False),
        sa.Column("issued_at", _WHEN, nullable=False),
        sa.Column("der", sa.LargeBinary, nullable=False),
        sa.UniqueConstraint("saga_id", "cert_type", name="uq_ca_certificates_saga_type"),
    )
    op.create_index("ix_ca_certificates_person", "ca_certificates", ["person_id", "holder"])
    op.create_index("ix_ca_certificates_se", "ca_certificates", ["se_cin"])
    op.create_index("ix_ca_certificates_card", "ca_certificates", ["card_serial"])
    op.create_index(
        "ix_ca_certificates_generation", "ca_certificates", ["ca_kind", "ca_generation"]
    )
    op.create_table(
        "ca_used_nonces",
        sa.Column("nonce", sa.String(128), primary_key=True),
        sa.Column("saga_id", sa.String(64), nullable=False),
        sa.Column("application_digest", sa.String(64), nullable=False),
        sa.Column("used_at", _WHEN, nullable=False),
    )
    op.create_table(
        "ca_applications",
        sa.Column("saga_id", sa.String(64), primary_key=True),
        sa.Column("person_id", sa.String(64), nullable=False),
        sa.Column("se_cin", sa.String(64), nullable=False),
        sa.Column("se_kdd", sa.String(64), nullable=False),
        sa.Column("card_serial", sa.String(40), nullable=False),
        sa.Column("cert_types", sa.String(16), nullable=False),
        sa.Column("pin_option", sa.Integer, nullable=True),
        sa.Column("application_digest", sa.String(64), nullable=False),
        sa.Column("verified_at", _WHEN, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "ca_applications",
        "ca_used_nonces",
        "ca_certificates",
        "ca_persons",
        "ca_generations",
    ):
        op.drop_table(table)
    drop_messaging_tables()
