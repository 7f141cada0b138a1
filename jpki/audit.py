"""``jpki audit``: re-read every store and name each broken invariant (Boulder's cert-checker).

Stores read: the orchestrator's sagas, the TSM's SE registry, the CA's certificates and the
fleet's persisted secure elements. The checks are pure functions over plain facts
(``audit(...)``), so each one is tested by building the violation on purpose; the loaders
turn each store into facts.

Invariants (each violation names one):
- ``active_certificate_without_key``: a live (valid or held, unexpired) phone certificate
  whose SE is not in service, has no JPKI applet, or holds no key matching the certificate;
- ``certificate_left_by_compensated_saga``: a saga that was compensated (or failed for the
  operator) left a certificate that is not revoked;
- ``two_active_phones``: one person has live certificates on two SEs (one phone per person);
- ``saga_past_deadline``: a saga still running past its deadline, and no operator flag
  (paused, or failed for the operator);
- ``keyed_applet_without_certificate``: an SE's JPKI applet holds keys but no live
  certificate is bound to that SE, and no running saga covers it nor a recorded
  "delete when next online";
- ``registry_disagrees_with_se``: the TSM's registry says the applet holds keys (or not)
  and the SE itself says otherwise.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select

from device_sim.se.card_manager import CardLifeCycle
from device_sim.se.element import SecureElement
from device_sim.se.jpki_applet import GeneratedKeys, JpkiApplet, JpkiAppletFactory, Profile
from infra.db.database import Database
from orchestrator.saga import Flow
from orchestrator.saga.tables import sagas
from protocol import jpki
from workers.ca import tables as ca_tables
from workers.tsm import registry as tsm_registry
from workers.tsm.provisioning import jpki_load_file


class Invariant(enum.StrEnum):
    ACTIVE_CERTIFICATE_WITHOUT_KEY = "active_certificate_without_key"
    CERTIFICATE_LEFT_BY_COMPENSATED_SAGA = "certificate_left_by_compensated_saga"
    TWO_ACTIVE_PHONES = "two_active_phones"
    SAGA_PAST_DEADLINE = "saga_past_deadline"
    KEYED_APPLET_WITHOUT_CERTIFICATE = "keyed_applet_without_certificate"
    REGISTRY_DISAGREES_WITH_SE = "registry_disagrees_with_se"


@dataclass(frozen=True, slots=True)
class Violation:
    invariant: Invariant
    subject: str  # a serial, a saga id, a person id or an SE's CIN
    detail: str

    def to_json(self) -> dict[str, str]:
        return {"invariant": self.invariant.value, "subject": self.subject, "detail": self.detail}


# -- facts ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CertificateFact:
    """A phone certificate as the CA stores it."""

    serial: str
    cert_type: str  # auth | sign
    person_id: str
    se_cin: str | None
    saga_id: str | None
    status: str  # valid | held | revoked
    expired: bool
    spki_sha256: str  # hex digest of the certificate's SubjectPublicKeyInfo

    @property
    def live(self) -> bool:
        return self.status in ("valid", "held") and not self.expired


@dataclass(frozen=True, slots=True)
class SagaFact:
    saga_id: str
    flow: str
    status: str  # running | compensating | completed | compensated | failed_needs_operator
    paused: bool
    deadline_at: float | None
    se_cin: str | None
    issued: tuple[str, ...] = ()  # serials the saga recorded as issued
    pending_applet_deletions: tuple[str, ...] = ()  # CINs to clean when next online

    @property
    def in_flight(self) -> bool:
        return self.status in ("running", "compensating")


@dataclass(frozen=True, slots=True)
class SeFact:
    """A secure element as the phone keeps it (the fleet's persisted state)."""

    cin: str
    device_id: str
    in_service: bool  # False once the phone is disposed of or destroyed
    applet_present: bool
    keys: dict[str, str] = field(default_factory=dict)  # cert type → hex SHA-256 of its SPKI


@dataclass(frozen=True, slots=True)
class RegistryFact:
    """What the TSM's registry believes about one SE."""

    cin: str
    holds_keys: bool
    operation_running: bool = False  # an operation was cut off: the next inspect tells


@dataclass(frozen=True, slots=True)
class Stores:
    certificates: Sequence[CertificateFact] = ()
    sagas: Sequence[SagaFact] = ()
    secure_elements: Sequence[SeFact] | None = None  # None: the fleet's store was not read
    registry: Sequence[RegistryFact] | None = None


# -- the checks ---------------------------------------------------------------------------------


def audit(stores: Stores, *, now: float) -> list[Violation]:
    found: list[Violation] = []
    found += _certificates_left_by_compensation(stores)
    found += _two_active_phones(stores.certificates)
    found += _sagas_past_deadline(stores.sagas, now)
    if stores.secure_elements is not None:
        found += _certificates_without_key(stores.certificates, stores.secure_elements)
        found += _keyed_applets_without_certificate(stores)
        if stores.registry is not None:
            found += _registry_disagreements(stores.registry, stores.secure_elements, stores.sagas)
    return found


def _certificates_left_by_compensation(stores: Stores) -> Iterable[Violation]:
    undone = {s.saga_id: s for s in stores.sagas if s.status in ("compensated",
                                                                   "failed_needs_operator")}
    by_serial = {c.serial: c for c in stores.certificates}
    for cert in stores.certificates:
        saga = undone.get(cert.saga_id or "")
        if saga is not None and cert.status != "revoked":
            yield Violation(
                Invariant.CERTIFICATE_LEFT_BY_COMPENSATED_SAGA, cert.serial,
                f"{cert.cert_type} certificate is {cert.status}; saga {saga.saga_id} "
                f"ended {saga.status}",
            )
    for saga in undone.values():  # serials the saga recorded that the CA does not show
        for serial in saga.issued:
            cert = by_serial.get(serial)
            if cert is None:
                continue  # the CA is the authority on what exists; nothing left there
            if cert.saga_id != saga.saga_id and cert.status != "revoked":
                yield Violation(
                    Invariant.CERTIFICATE_LEFT_BY_COMPENSATED_SAGA, serial,
                    f"recorded by saga {saga.saga_id} ({saga.status}) and still {cert.status}",
                )


def _two_active_phones(certificates: Sequence[CertificateFact]) -> Iterable[Violation]:
    phones: dict[str, set[str]] = defaultdict(set)
    for cert in certificates:
        if cert.live and cert.se_cin:
            phones[cert.person_id].add(cert.se_cin)
    for person_id, ses in sorted(phones.items()):
        if len(ses) > 1:
            yield Violation(
                Invariant.TWO_ACTIVE_PHONES, person_id,
                f"live certificates on {len(ses)} SEs: {', '.join(sorted(ses))}",
            )


def _sagas_past_deadline(sagas: Sequence[SagaFact], now: float) -> Iterable[Violation]:
    for saga in sagas:
        if saga.in_flight and not saga.paused and saga.deadline_at is not None \
                and now > saga.deadline_at:
            yield Violation(
                Invariant.SAGA_PAST_DEADLINE, saga.saga_id,
                f"{saga.flow} still {saga.status} {now - saga.deadline_at:.0f}s past its "
                "deadline, no operator flag",
            )


def _certificates_without_key(
    certificates: Sequence[CertificateFact], ses: Sequence[SeFact]
) -> Iterable[Violation]:
    by_cin = {se.cin: se for se in ses}
    for cert in certificates:
        if not cert.live:
            continue
        se = by_cin.get(cert.se_cin or "")
        if se is None:
            why = f"its SE {cert.se_cin} is on no phone"
        elif not se.in_service:
            why = f"its SE {se.cin} ({se.device_id}) is out of service"
        elif not se.applet_present:
            why = f"no JPKI applet on SE {se.cin} ({se.device_id})"
        elif se.keys.get(cert.cert_type) != cert.spki_sha256:
            why = f"SE {se.cin} ({se.device_id}) holds no key matching it"
        else:
            continue
        yield Violation(Invariant.ACTIVE_CERTIFICATE_WITHOUT_KEY, cert.serial,
                        f"{cert.status} {cert.cert_type} certificate: {why}")


def _keyed_applets_without_certificate(stores: Stores) -> Iterable[Violation]:
    live_on = {c.se_cin for c in stores.certificates if c.live and c.se_cin}
    covered = {s.se_cin for s in stores.sagas if s.in_flight and s.se_cin}
    pending = {cin for s in stores.sagas for cin in s.pending_applet_deletions}
    for se in stores.secure_elements or ():
        if not se.in_service or not se.applet_present or not se.keys:
            continue
        if se.cin in live_on or se.cin in covered or se.cin in pending:
            continue
        yield Violation(
            Invariant.KEYED_APPLET_WITHOUT_CERTIFICATE, se.cin,
            f"applet on {se.device_id} holds {', '.join(sorted(se.keys))} key(s); no live "
            "certificate, no running saga, no recorded deletion",
        )


def _registry_disagreements(
    registry: Sequence[RegistryFact], ses: Sequence[SeFact], sagas: Sequence[SagaFact]
) -> Iterable[Violation]:
    by_cin = {se.cin: se for se in ses}
    covered = {s.se_cin for s in sagas if s.in_flight and s.se_cin}
    for record in registry:
        se = by_cin.get(record.cin)
        if se is None or record.operation_running or record.cin in covered:
            continue
        on_se = se.applet_present and bool(se.keys)
        if record.holds_keys != on_se:
            yield Violation(
                Invariant.REGISTRY_DISAGREES_WITH_SE, record.cin,
                f"registry says keys={record.holds_keys}, the SE on {se.device_id} says "
                f"keys={on_se}",
            )


def render(violations: Sequence[Violation], counts: dict[str, int]) -> str:
    lines = ["audit: read " + ", ".join(f"{n} {what}" for what, n in counts.items())]
    if not violations:
        lines.append("audit: every invariant holds")
    for v in violations:
        lines.append(f"BROKEN {v.invariant.value}: {v.subject}: {v.detail}")
    return "\n".join(lines)


def exit_code(violations: Sequence[Violation]) -> int:
    return 1 if violations else 0


def dump_json(violations: Sequence[Violation], counts: dict[str, int]) -> str:
    return json.dumps({"counts": counts, "violations": [v.to_json() for v in violations]},
                      indent=2)


# -- loaders: each store into facts -----------------------------------------------------------


async def load_sagas(db: Database, flows: Sequence[Flow[Any]]) -> list[SagaFact]:
    deadlines = {f.name: f.deadline for f in flows}
    async with db.transaction() as conn:
        rows = (await conn.execute(select(sagas))).all()
    facts = []
    for row in rows:
        data = json.loads(row.data)
        deadline = deadlines.get(row.flow)
        se = data.get("se") if isinstance(data, dict) else None
        facts.append(SagaFact(
            saga_id=row.saga_id,
            flow=row.flow,
            status=row.status,
            paused=bool(row.paused),
            deadline_at=row.created_at + deadline if deadline is not None else None,
            se_cin=se.get("cin") if isinstance(se, dict) else None,
            issued=tuple(c["serial"] for c in data.get("issued", ())),
            pending_applet_deletions=(
                tuple(data.get("old_se", ())) if row.status == "completed" else ()
            ),
        ))
    return facts


async def load_certificates(db: Database, *, now: datetime) -> list[CertificateFact]:
    query = select(ca_tables.certificates).where(ca_tables.certificates.c.holder == "phone")
    async with db.transaction() as conn:
        rows = (await conn.execute(query)).all()
    facts = []
    for row in rows:
        certificate = x509.load_der_x509_certificate(row.der)
        spki = certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        not_after = row.not_after if row.not_after.tzinfo else row.not_after.replace(tzinfo=UTC)
        facts.append(CertificateFact(
            serial=row.serial, cert_type=row.cert_type, person_id=row.person_id,
            se_cin=row.se_cin, saga_id=row.saga_id, status=row.status,
            expired=not_after <= now, spki_sha256=hashlib.sha256(spki).hexdigest(),
        ))
    return facts


async def load_registry(db: Database) -> list[RegistryFact]:
    async with db.transaction() as conn:
        elements = (await conn.execute(select(tsm_registry.secure_elements))).all()
        running = set((await conn.execute(
            select(tsm_registry.tsm_operations.c.cin)
            .where(tsm_registry.tsm_operations.c.status == "running")
        )).scalars())
    return [
        RegistryFact(cin=row.cin, holds_keys=bool(row.holds_keys),
                     operation_running=row.cin in running or row.applet_state == "unknown")
        for row in elements
    ]


def se_fact(element: SecureElement, device_id: str) -> SeFact:
    manager = element.manager
    in_service = manager.life_cycle not in (CardLifeCycle.CARD_LOCKED, CardLifeCycle.TERMINATED)
    app = next((a for a in manager.applications.values() if a.aid == jpki.AID), None)
    keys: dict[str, str] = {}
    if app is not None and isinstance(app.applet, JpkiApplet):
        for kind, ef in (("auth", jpki.EF.AUTH_KEY), ("sign", jpki.EF.SIGN_KEY)):
            public = app.applet.public_key(ef)
            if public is not None:
                spki = public.public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
                keys[kind] = hashlib.sha256(spki).hexdigest()
    return SeFact(cin=element.identity.cin.hex().upper(), device_id=device_id,
                  in_service=in_service, applet_present=app is not None, keys=keys)


def load_phones(phones_dir: Path) -> list[SeFact] | None:
    """The fleet's persisted SEs (``<device>.se.json``, written by ``Fleet.save``)."""
    if not phones_dir.is_dir():
        return None
    load_files = [jpki_load_file(JpkiAppletFactory(Profile.PHONE, GeneratedKeys()))]
    facts = []
    for path in sorted(phones_dir.glob("*.se.json")):
        element = SecureElement.load(path, load_files)
        facts.append(se_fact(element, path.name.removesuffix(".se.json")))
    return facts


async def audit_stores(
    *, orchestrator: Database, ca: Database, tsm: Database | None, phones: Path | None,
    now: float | None = None,
) -> list[Violation]:
    stores, _counts = await read_stores(orchestrator=orchestrator, ca=ca, tsm=tsm, phones=phones)
    return audit(stores, now=time.time() if now is None else now)


async def read_stores(
    *, orchestrator: Database, ca: Database, tsm: Database | None, phones: Path | None,
) -> tuple[Stores, dict[str, int]]:
    from orchestrator.service import FLOWS

    sagas_ = await load_sagas(orchestrator, FLOWS)
    certificates = await load_certificates(ca, now=datetime.now(UTC))
    registry = await load_registry(tsm) if tsm is not None else None
    ses = await asyncio.to_thread(load_phones, phones) if phones is not None else None
    counts = {"sagas": len(sagas_), "phone certificates": len(certificates)}
    if registry is not None:
        counts["TSM registry rows"] = len(registry)
    if ses is not None:
        counts["phones' SEs"] = len(ses)
    return Stores(certificates, sagas_, ses, registry), counts


@click.command("audit")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("data"),
              show_default=True, help="SQLite stores and the fleet's phones/")
@click.option("--db-url", envvar="JPKI_DB_URL", default=None,
              help="PostgreSQL URL of every service's schema (env JPKI_DB_URL)")
@click.option("--orchestrator-db-url", default=None, help="override for the orchestrator")
@click.option("--ca-db-url", default=None, help="override for the CA")
@click.option("--tsm-db-url", default=None, help="override for the TSM")
@click.option("--phones-dir", type=click.Path(path_type=Path), default=None,
              help="the fleet's persisted SEs (default: <data dir>/phones)")
@click.option("--json", "as_json", is_flag=True, help="print the findings as JSON")
def audit_command(
    data_dir: Path, db_url: str | None, orchestrator_db_url: str | None,
    ca_db_url: str | None, tsm_db_url: str | None, phones_dir: Path | None, as_json: bool,
) -> None:
    """Re-read every store and name each broken invariant; exit 1 if any is broken."""

    async def go() -> tuple[list[Violation], dict[str, int]]:
        dbs = {
            service: Database.for_service(service, url=override or db_url, data_dir=data_dir)
            for service, override in (("orchestrator", orchestrator_db_url),
                                      ("ca", ca_db_url), ("tsm", tsm_db_url))
        }
        try:
            stores, counts = await read_stores(
                orchestrator=dbs["orchestrator"], ca=dbs["ca"], tsm=dbs["tsm"],
                phones=phones_dir or data_dir / "phones",
            )
        finally:
            for db in dbs.values():
                await db.close()
        return audit(stores, now=time.time()), counts

    violations, counts = asyncio.run(go())
    click.echo(dump_json(violations, counts) if as_json else render(violations, counts))
    sys.exit(exit_code(violations))
