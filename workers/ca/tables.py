"""The CA's tables (SQLAlchemy Core). The migration history in ``migrations/`` creates them.

Serials are stored as upper-case hex text: they are 159-bit random numbers, wider than any
SQL integer. Times are timezone-aware UTC ``DateTime`` values.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Date,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

# One row a CA key generation; generations of one kind share the CA name (DOMAIN.md §2).
ca_generations = Table(
    "ca_generations",
    metadata,
    Column("kind", String(8), primary_key=True),
    Column("generation", Integer, primary_key=True),
    Column("key_id", String(64), nullable=False, unique=True),  # hex SKI
    Column("certificate", LargeBinary, nullable=False),  # DER
    Column("key_file", String(255), nullable=False),  # encrypted PKCS#8, relative to data dir
    Column("active", Boolean, nullable=False),  # the generation that signs new certificates
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("crl_number", Integer, nullable=False, default=0),
    Column("crl_dirty", Boolean, nullable=False, default=True),  # a status changed since
    Column("crl", LargeBinary, nullable=True),  # the latest CRL (DER)
)

# The person behind a My Number Card; links their card certificates across renewals.
persons = Table(
    "ca_persons",
    metadata,
    Column("person_id", String(64), primary_key=True),
    Column("name", Text, nullable=False),
    Column("date_of_birth", Date, nullable=False),
    Column("sex", String(1), nullable=False),
    Column("address", Text, nullable=False),
    Column("prefecture", Text, nullable=False),
    Column("city", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

certificates = Table(
    "ca_certificates",
    metadata,
    Column("serial", String(40), primary_key=True),
    Column("ca_kind", String(8), nullable=False),
    Column("ca_generation", Integer, nullable=False),
    Column("holder", String(8), nullable=False),  # card | phone
    Column("cert_type", String(8), nullable=False),  # auth | sign
    Column("person_id", String(64), nullable=False),
    Column("se_cin", String(64), nullable=True),  # phone certificates: the SE holding the key
    Column("card_serial", String(40), nullable=True),  # phone: the card certificate it came from
    Column("saga_id", String(64), nullable=True),  # phone: the issuance saga
    Column("status", String(8), nullable=False),  # valid | held | revoked
    Column("reason", String(32), nullable=True),  # RFC 5280 reason name when held/revoked
    Column("cause", String(32), nullable=True),  # our business cause of the last change
    Column("status_changed_at", DateTime(timezone=True), nullable=True),
    Column("not_before", DateTime(timezone=True), nullable=False),
    Column("not_after", DateTime(timezone=True), nullable=False),
    Column("issued_at", DateTime(timezone=True), nullable=False),
    Column("der", LargeBinary, nullable=False),
    # Idempotent issuance (ARCHITECTURE §3): one certificate per (saga, type). Card
    # certificates have no saga and NULLs never collide.
    UniqueConstraint("saga_id", "cert_type", name="uq_ca_certificates_saga_type"),
)
Index("ix_ca_certificates_person", certificates.c.person_id, certificates.c.holder)
Index("ix_ca_certificates_se", certificates.c.se_cin)
Index("ix_ca_certificates_card", certificates.c.card_serial)
Index("ix_ca_certificates_generation", certificates.c.ca_kind, certificates.c.ca_generation)

# Nonces of applications the CA accepted: a nonce is good for one application only.
used_nonces = Table(
    "ca_used_nonces",
    metadata,
    Column("nonce", String(128), primary_key=True),  # hex
    Column("saga_id", String(64), nullable=False),
    Column("application_digest", String(64), nullable=False),  # hex SHA-256 of the signed bytes
    Column("used_at", DateTime(timezone=True), nullable=False),
)

# Verified applications: what issuance in the same saga may rely on.
applications = Table(
    "ca_applications",
    metadata,
    Column("saga_id", String(64), primary_key=True),
    Column("person_id", String(64), nullable=False),
    Column("se_cin", String(64), nullable=False),
    Column("se_kdd", String(64), nullable=False),
    Column("card_serial", String(40), nullable=False),
    Column("cert_types", String(16), nullable=False),  # "auth", "sign" or "auth,sign"
    Column("pin_option", Integer, nullable=True),
    Column("application_digest", String(64), nullable=False),
    Column("verified_at", DateTime(timezone=True), nullable=False),
)
