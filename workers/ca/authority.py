"""The JPKI CA: key generations, persons, card and phone certificates, statuses, CRL, OCSP.

Usage for simulated My Number Cards (``device_sim/card.py``) and tests: open the CA once
with ``ca = await CertificateAuthority.open(data_dir, Passphrase(b"at least 8 bytes"))``
(SQLite in ``data_dir`` unless ``db_url=``; generation 1 of both CAs is created on first
open), describe the holder as ``Person(person_id, BasicFacts(name, date_of_birth, Sex.MALE,
address), prefecture, city)`` (the person id links a person's card certificates across
renewals), then ``card = await ca.issue_card_certificates(person, auth_public_key,
sign_public_key, card_expiry=datetime(...))`` gives ``card.auth`` / ``card.sign``
(``IssuedCertificate``: ``.der``, ``.serial``, ``.ca_der``) for EF 000A/000B/0001/0002. A
caller that must answer synchronously (``device_sim.card.CardIssuer``) calls
``pending = ca.build_card_certificates(...)`` inside its callback, returns the DER from
``pending.auth`` / ``pending.sign``, and afterwards ``await ca.record_card_certificates(pending)``:
the card's certificates are unknown to verification until recorded. Issuing card
certificates for a person who already holds some is a card renewal: the old ones are
revoked (superseded) and, by cascade, the phone certificates issued from them.
``await ca.revoke(serial, Cause.CARD_FACTS_CHANGED)`` revokes a card signing certificate
(and, by cascade, the phone signing certificates issued from it). ``await ca.close()``.

This object is the storage-backed core; the message shell is ``workers/ca/service.py``, the
HTTP shell ``workers/ca/http.py``. The clock and randomness are injected for tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import structlog
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509 import ocsp
from sqlalchemy import and_, insert, select, update
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from infra.db.database import Database
from infra.db.fast import chunks, execute_many, fetch, in_list
from workers.ca import tables as t
from workers.ca.application import (
    Application,
    SeIdentity,
    application_digest,
    parse_application,
    verify_card_signature,
    verify_proof_of_possession,
)
from workers.ca.errors import (
    ApplicationNotVerified,
    CaError,
    CardCertificateExpired,
    CardCertificateRevoked,
    CertificateNotFound,
    InvalidRequest,
    InvalidTransition,
    MalformedApplication,
    NonceExpired,
    NonceReplayed,
    NonceUnknown,
    UnknownCardCertificate,
    UntrustedCardCertificate,
    WrongSecureElement,
)
from workers.ca.hot_sql import (
    INSERT_CERTIFICATE,
    ISSUE_READ,
    STATE_CHECK_READ,
    VERIFY_READ,
    certificate_row,
    record_application,
    time_columns,
    utc,
)
from workers.ca.keystore import Passphrase, read_key, write_key
from workers.ca.profiles import (
    RSA_BITS,
    RSA_EXPONENT,
    BasicFacts,
    CaKind,
    CaNames,
    CertType,
    EndEntityTemplate,
    Holder,
    Issuer,
    Sex,
    auth_subject,
    auth_subject_rdns,
    authority_key_identifier,
    build_ca_certificate,
    build_end_entity,
    end_entity_template,
    require_rsa_2048,
    sign_subject,
    sign_subject_rdns,
)
from workers.ca.revocation import (
    HOLD_CAUSES,
    REASON_FOR_CAUSE,
    RELEASE_CAUSES,
    Cause,
    OcspAnswer,
    RevokedEntry,
    Status,
    build_crl,
    build_ocsp_response,
    issuer_key_hash,
)
from workers.ca.state_check import ExistingCertificate, StateCheck, decide_branch

log = structlog.get_logger("ca")

# Parsed templates and verified card certificates kept per process (bounded, least recently
# used first out): a card's certificates are used for one saga after another.
_CACHE_SIZE = 4096

_T = TypeVar("_T")
Clock = Callable[[], datetime]
RandomBytes = Callable[[int], bytes]
KeyFactory = Callable[[], rsa.RSAPrivateKey]

CA_VALIDITY = timedelta(days=20 * 365)
CRL_VALIDITY = timedelta(hours=24)
OCSP_VALIDITY = timedelta(hours=1)
# A signed application is good this long after ``requested_at`` (the card session; seed §3.(2)).
APPLICATION_FRESHNESS = timedelta(minutes=15)
CLOCK_SKEW = timedelta(minutes=2)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=RSA_EXPONENT, key_size=RSA_BITS)


def serial_hex(serial: int) -> str:
    return f"{serial:040X}"


@dataclass(frozen=True, slots=True)
class Person:
    person_id: str
    facts: BasicFacts
    prefecture: str
    city: str


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    serial: str  # 40 upper-case hex digits
    cert_type: CertType
    der: bytes
    not_after: datetime
    ca_der: bytes  # the issuing CA generation's certificate

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.der)


@dataclass(frozen=True, slots=True)
class CardCertificates:
    person_id: str
    auth: IssuedCertificate
    sign: IssuedCertificate
    revoked_previous: tuple[str, ...]  # serials revoked by this renewal (card and phone)

    @property
    def auth_ca_der(self) -> bytes:
        return self.auth.ca_der

    @property
    def sign_ca_der(self) -> bytes:
        return self.sign.ca_der


@dataclass(frozen=True, slots=True)
class PendingCardCertificates:
    """Card certificates signed but not yet recorded (see ``build_card_certificates``)."""

    person: Person
    issued_at: datetime
    auth: IssuedCertificate
    sign: IssuedCertificate
    auth_generation: int
    sign_generation: int


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """A public key from the applet with the proof of possession the TSM forwards."""

    cert_type: CertType
    public_key_der: bytes  # SubjectPublicKeyInfo
    challenge: bytes  # the TSM's challenge given to GENERATE KEY PAIR
    proof: bytes  # PKCS#1 v1.5 / SHA-256 over protocol.jpki.proof_message(...)


@dataclass(frozen=True, slots=True)
class VerifiedApplication:
    saga_id: str
    person_id: str
    se: SeIdentity
    card_serial: str
    certificates: tuple[CertType, ...]
    pin_option: int | None


@dataclass(frozen=True, slots=True)
class StatusChange:
    serial: str
    cert_type: CertType
    holder: Holder
    status: Status
    reason: str | None
    changed: bool  # False when the certificate already had this status (idempotent repeat)


@dataclass(frozen=True, slots=True)
class CertificateRecord:
    serial: str
    ca_kind: CaKind
    ca_generation: int
    holder: Holder
    cert_type: CertType
    person_id: str
    se_cin: str | None
    card_serial: str | None
    saga_id: str | None
    status: Status
    reason: str | None
    cause: str | None
    status_changed_at: datetime | None
    not_before: datetime
    not_after: datetime
    der: bytes

    @classmethod
    def from_row(cls, row: Any) -> CertificateRecord:
        return cls(
            serial=row.serial,
            ca_kind=CaKind(row.ca_kind),
            ca_generation=row.ca_generation,
            holder=Holder(row.holder),
            cert_type=CertType(row.cert_type),
            person_id=row.person_id,
            se_cin=row.se_cin,
            card_serial=row.card_serial,
            saga_id=row.saga_id,
            status=Status(row.status),
            reason=row.reason,
            cause=row.cause,
            status_changed_at=utc(row.status_changed_at) if row.status_changed_at else None,
            not_before=utc(row.not_before),
            not_after=utc(row.not_after),
            der=row.der,
        )


class CertificateAuthority:
    """Both JPKI CAs over one store. Create with ``await CertificateAuthority.open(...)``."""

    def __init__(
        self,
        db: Database,
        data_dir: Path,
        passphrase: Passphrase,
        *,
        names: CaNames,
        clock: Clock,
        random_bytes: RandomBytes,
        new_key: KeyFactory,
    ) -> None:
        self._db = db
        self._data_dir = data_dir
        self._passphrase = passphrase
        self._names = names
        self._clock = clock
        self._random = random_bytes
        self._new_key = new_key
        self._issuers: dict[tuple[CaKind, int], Issuer] = {}
        self._active: dict[CaKind, int] = {}
        # One signing thread a CPU: pyca's RSA signature runs without the GIL, and more
        # threads than CPUs measurably slow it down.
        self._signing_threads = os.cpu_count() or 1
        self._signer = ThreadPoolExecutor(
            max_workers=self._signing_threads, thread_name_prefix="ca-sign"
        )
        self._templates: OrderedDict[tuple[CaKind, int, str], EndEntityTemplate] = OrderedDict()
        # fingerprint (SHA-256 of the DER) of a card certificate -> the key id of the signing
        # CA generation whose signature on it verified
        self._trusted_cards: OrderedDict[bytes, bytes] = OrderedDict()

    def __repr__(self) -> str:
        return f"CertificateAuthority({self._db!r}, generations={sorted(self._issuers)})"

    # ---------------------------------------------------------------- set-up and keys

    @classmethod
    async def open(
        cls,
        data_dir: str | Path,
        passphrase: Passphrase,
        *,
        db_url: str | None = None,
        names: CaNames | None = None,
        clock: Clock = _utc_now,
        random_bytes: RandomBytes = os.urandom,
        new_key: KeyFactory = _new_rsa_key,
        db: Database | None = None,
    ) -> CertificateAuthority:
        """Open the CA in ``data_dir`` (key files; SQLite unless ``db_url``/``db``), migrate its
        tables and create generation 1 of each CA if there is none yet."""
        from infra.db.migrate import upgrade

        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        database = db or Database.for_service("ca", url=db_url, data_dir=data_dir)
        await upgrade(database, "ca")
        ca = cls(
            database,
            data_dir,
            passphrase,
            names=names or CaNames(),
            clock=clock,
            random_bytes=random_bytes,
            new_key=new_key,
        )
        try:
            await ca.load_generations()
            for kind in CaKind:
                if kind not in ca._active:
                    await ca.rollover(kind)
        except BaseException:
            # a CA that cannot open (wrong passphrase) leaves no pool or thread behind
            ca._signer.shutdown(wait=False)
            if db is None:
                await database.close()
            raise
        return ca

    async def close(self) -> None:
        self._signer.shutdown(wait=True)
        await self._db.close()

    @property
    def database(self) -> Database:
        return self._db

    @asynccontextmanager
    async def _tx(self, conn: AsyncConnection | None) -> AsyncIterator[AsyncConnection]:
        """The caller's transaction (the message shell's inbox transaction), or our own."""
        if conn is not None:
            yield conn
            return
        async with self._db.transaction() as own:
            yield own

    async def load_generations(self) -> None:
        """(Re)load every CA generation and its key (after another replica rolled over)."""
        async with self._db.transaction() as conn:
            rows = (await conn.execute(select(t.ca_generations))).all()
        for row in rows:
            kind = CaKind(row.kind)
            if (kind, row.generation) not in self._issuers:
                self._issuers[(kind, row.generation)] = Issuer(
                    kind=kind,
                    generation=row.generation,
                    certificate=x509.load_der_x509_certificate(row.certificate),
                    key=read_key(self._data_dir / row.key_file, self._passphrase),
                )
            if row.active:
                self._active[kind] = row.generation

    def issuer(self, kind: CaKind, generation: int | None = None) -> Issuer:
        generation = self._active[kind] if generation is None else generation
        try:
            return self._issuers[(kind, generation)]
        except KeyError:
            raise InvalidRequest(f"no {kind.value} CA generation {generation}") from None

    def generations(self) -> list[Issuer]:
        return [self._issuers[key] for key in sorted(self._issuers)]

    def _issuer_by_key_id(self, key_id: bytes | None) -> Issuer | None:
        for issuer in self._issuers.values():
            if issuer.key_id == key_id:
                return issuer
        return None

    async def rollover(self, kind: CaKind) -> Issuer:
        """A new key generation under the same CA name; it signs everything from now on.

        Older generations keep answering OCSP and publishing CRLs for what they issued.
        """
        now = self._clock()
        generation = max((g for k, g in self._issuers if k is kind), default=0) + 1
        key = self._new_key()
        certificate = build_ca_certificate(
            name=self._names.for_kind(kind),
            key=key,
            serial=self._serial(),
            not_before=now - timedelta(minutes=5),
            not_after=now + CA_VALIDITY,
        )
        key_file = f"keys/{kind.value}-ca-g{generation}.key.pem"
        write_key(self._data_dir / key_file, key, self._passphrase)
        issuer = Issuer(kind=kind, generation=generation, certificate=certificate, key=key)
        async with self._db.transaction() as conn:
            await conn.execute(
                update(t.ca_generations)
                .where(t.ca_generations.c.kind == kind.value)
                .values(active=False)
            )
            await conn.execute(
                insert(t.ca_generations).values(
                    kind=kind.value,
                    generation=generation,
                    key_id=issuer.key_id.hex().upper(),
                    certificate=certificate.public_bytes(serialization.Encoding.DER),
                    key_file=key_file,
                    active=True,
                    created_at=now,
                    crl_number=0,
                    crl_dirty=True,
                )
            )
        self._issuers[(kind, generation)] = issuer
        self._active[kind] = generation
        log.info("ca.rollover", kind=kind.value, generation=generation, key_id=issuer.key_id.hex())
        return issuer

    def _serial(self) -> int:
        # RFC 5280 §4.1.2.2: positive, at most 20 octets; 159 random bits (CA/B style)
        return (int.from_bytes(self._random(20), "big") >> 1) or 1

    def _opaque_id(self) -> str:
        return self._random(12).hex().upper()

    # ---------------------------------------------------------------- card certificates

    async def issue_card_certificates(
        self,
        person: Person,
        auth_public_key: rsa.RSAPublicKey,
        sign_public_key: rsa.RSAPublicKey,
        *,
        card_expiry: datetime,
    ) -> CardCertificates:
        """Certificates for a simulated My Number Card whose applet generated these keys.

        Validity: to the 5th birthday after issue, capped at the card's expiry (DOMAIN §2).
        A person who already has card certificates is renewing the card: the old ones are
        revoked (superseded) and their phone certificates with them.
        """
        pending = self.build_card_certificates(
            person, auth_public_key, sign_public_key, card_expiry=card_expiry
        )
        return await self.record_card_certificates(pending)

    def build_card_certificates(
        self,
        person: Person,
        auth_public_key: rsa.RSAPublicKey,
        sign_public_key: rsa.RSAPublicKey,
        *,
        card_expiry: datetime,
    ) -> PendingCardCertificates:
        """The signing half of ``issue_card_certificates``, synchronous and without storage,
        for a caller that must answer synchronously (``device_sim.card``'s ``CardIssuer``).
        Nothing is valid until ``record_card_certificates`` stored it."""
        require_rsa_2048(auth_public_key)
        require_rsa_2048(sign_public_key)
        now = self._clock()
        not_after = min(_fifth_birthday_after(person.facts.date_of_birth, now), utc(card_expiry))
        if not_after <= now:
            raise InvalidRequest("the card expires before its certificates could start")
        auth_issuer, sign_issuer = self.issuer(CaKind.AUTH), self.issuer(CaKind.SIGN)
        auth = build_end_entity(
            issuer=auth_issuer,
            cert_type=CertType.AUTH,
            subject=auth_subject(self._opaque_id()),
            public_key=auth_public_key,
            serial=self._serial(),
            not_before=now,
            not_after=not_after,
            facts=None,
        )
        sign = build_end_entity(
            issuer=sign_issuer,
            cert_type=CertType.SIGN,
            subject=sign_subject(person.prefecture, person.city, self._opaque_id()),
            public_key=sign_public_key,
            serial=self._serial(),
            not_before=now,
            not_after=not_after,
            facts=person.facts,
        )
        return PendingCardCertificates(
            person=person,
            issued_at=now,
            auth=self._issued(auth, CertType.AUTH, auth_issuer),
            sign=self._issued(sign, CertType.SIGN, sign_issuer),
            auth_generation=auth_issuer.generation,
            sign_generation=sign_issuer.generation,
        )

    async def record_card_certificates(
        self, pending: PendingCardCertificates, *, conn: AsyncConnection | None = None
    ) -> CardCertificates:
        """Store card certificates built by ``build_card_certificates`` (renewal included)."""
        person, now = pending.person, pending.issued_at
        async with self._tx(conn) as conn:
            await self._upsert_person(conn, person, now)
            previous = await self._active_certificates(
                conn, person_id=person.person_id, holder=Holder.CARD
            )
            revoked: list[StatusChange] = []
            for record in previous:
                revoked += await self._apply(conn, record, Status.REVOKED, Cause.CARD_RENEWED, now)
            for issued, generation in (
                (pending.auth, pending.auth_generation),
                (pending.sign, pending.sign_generation),
            ):
                issuer = self.issuer(issued.cert_type.ca_kind, generation)
                await self._insert_certificate(
                    conn,
                    issued.certificate,
                    issuer,
                    Holder.CARD,
                    person.person_id,
                    None,
                    None,
                    None,
                    now,
                )
        log.info(
            "ca.card_issued",
            person_id=person.person_id,
            auth_serial=pending.auth.serial,
            sign_serial=pending.sign.serial,
            renewal=bool(previous),
        )
        return CardCertificates(
            person_id=person.person_id,
            auth=pending.auth,
            sign=pending.sign,
            revoked_previous=tuple(change.serial for change in revoked if change.changed),
        )

    async def _upsert_person(self, conn: AsyncConnection, person: Person, now: datetime) -> None:
        values = {
            "name": person.facts.name,
            "date_of_birth": person.facts.date_of_birth,
            "sex": person.facts.sex.value,
            "address": person.facts.address,
            "prefecture": person.prefecture,
            "city": person.city,
        }
        result = await conn.execute(
            update(t.persons).where(t.persons.c.person_id == person.person_id).values(**values)
        )
        if result.rowcount == 0:
            await conn.execute(
                insert(t.persons).values(person_id=person.person_id, created_at=now, **values)
            )

    async def person(self, person_id: str, *, conn: AsyncConnection | None = None) -> Person | None:
        async with self._tx(conn) as conn:
            row = (
                await conn.execute(select(t.persons).where(t.persons.c.person_id == person_id))
            ).first()
        if row is None:
            return None
        return Person(
            person_id=row.person_id,
            facts=BasicFacts(
                name=row.name,
                date_of_birth=row.date_of_birth,
                sex=Sex(row.sex),
                address=row.address,
            ),
            prefecture=row.prefecture,
            city=row.city,
        )

    # ---------------------------------------------------------------- applications

    async def verify_application(
        self,
        *,
        saga_id: str,
        expected_nonce: bytes,
        expected_se: SeIdentity,
        to_be_signed: bytes,
        signature: bytes,
        card_certificate: bytes,
        conn: AsyncConnection | None = None,
    ) -> VerifiedApplication:
        """FLOWS §1 step 6. Raises a distinct ``ApplicationRefused`` subclass per reason; on
        success records the verified application (what issuance in this saga relies on) and
        consumes the nonce. A redelivered request for the same saga and bytes returns the
        same result."""
        now = self._clock()
        try:
            card_cert = x509.load_der_x509_certificate(card_certificate)
        except ValueError:
            raise MalformedApplication("the card certificate is not DER X.509") from None
        self._check_card_chain(card_cert, card_certificate)
        verify_card_signature(card_cert.public_key(), signature, to_be_signed)
        application = parse_application(to_be_signed)
        digest = application_digest(to_be_signed)
        serial = serial_hex(card_cert.serial_number)

        async with self._tx(conn) as conn:
            seen = await _read_verification(conn, serial, application.nonce.hex(), saga_id)
            card = seen.card
            if card is None or card.holder is not Holder.CARD or card.der != card_certificate:
                raise UnknownCardCertificate("the card certificate was not issued to a card by us")
            if card.cert_type is not CertType.SIGN:
                raise UntrustedCardCertificate("applications are signed with the card signing key")
            if not card.not_before <= now < card.not_after:
                raise CardCertificateExpired("the card certificate is not within its validity")
            if card.status is not Status.VALID:
                raise CardCertificateRevoked(f"the card certificate is {card.status.value}")
            if seen.nonce_used_by is not None:
                if seen.nonce_used_by == (saga_id, digest) and seen.verified is not None:
                    return seen.verified
                raise NonceReplayed("this nonce was already used by an application")
            if application.nonce != expected_nonce or application.application_id != saga_id:
                raise NonceUnknown("the application was not made for this saga's nonce")
            requested_at = application.requested_at
            if requested_at > now + CLOCK_SKEW or now - requested_at > APPLICATION_FRESHNESS:
                raise NonceExpired("the application is not fresh")
            if application.se != expected_se:
                raise WrongSecureElement("the application names another secure element")
            if seen.verified is not None:
                raise NonceReplayed("this saga already has a verified application")
            write_time = time_columns(conn.dialect).write
            await record_application(
                conn,
                (application.nonce.hex(), saga_id, digest, write_time(now)),
                (
                    saga_id,
                    card.person_id,
                    application.se.cin,
                    application.se.kdd,
                    serial,
                    ",".join(sorted(set(application.certificates))),
                    application.pin_option,
                    digest,
                    write_time(now),
                ),
            )
        log.info(
            "ca.application_verified",
            saga_id=saga_id,
            person_id=card.person_id,
            se=application.se.cin,
        )
        return _verified_from(application, saga_id, card.person_id, serial)

    def _check_card_chain(self, card_cert: x509.Certificate, der: bytes) -> None:
        """The card certificate is signed by one of our signing-CA generations. A verified
        chain is remembered by the certificate's fingerprint and the issuing key id, so a
        card's later applications skip the CA signature check; the card's own signature over
        each application is checked every time."""
        key_id = authority_key_identifier(card_cert)
        fingerprint = hashlib.sha256(der).digest()
        if key_id is not None and self._trusted_cards.get(fingerprint) == key_id:
            self._trusted_cards.move_to_end(fingerprint)
            return
        issuer = self._issuer_by_key_id(key_id)
        if issuer is None or issuer.kind is not CaKind.SIGN:
            raise UntrustedCardCertificate("the card certificate is not from our signing CA")
        try:
            card_cert.verify_directly_issued_by(issuer.certificate)
        except (ValueError, TypeError, InvalidSignature):
            raise UntrustedCardCertificate(
                "the card certificate's signature does not verify"
            ) from None
        _remember(self._trusted_cards, fingerprint, issuer.key_id)

    async def _verified(self, conn: AsyncConnection, saga_id: str) -> VerifiedApplication | None:
        row = (
            await conn.execute(select(t.applications).where(t.applications.c.saga_id == saga_id))
        ).first()
        return None if row is None else _verified_row(row)

    async def verified_application(
        self, saga_id: str, *, conn: AsyncConnection | None = None
    ) -> VerifiedApplication:
        async with self._tx(conn) as conn:
            verified = await self._verified(conn, saga_id)
        if verified is None:
            raise ApplicationNotVerified("no verified application for this saga")
        return verified

    # ---------------------------------------------------------------- phase-3 state check

    async def state_check(self, saga_id: str, *, conn: AsyncConnection | None = None) -> StateCheck:
        """FLOWS §3: the branch for the person and SE of this saga's verified application."""
        now = self._clock()
        async with self._tx(conn) as conn:
            rows = await fetch(
                conn, STATE_CHECK_READ, (Holder.PHONE.value, Status.REVOKED.value, saga_id)
            )
            read_time = time_columns(conn.dialect).read
        if not rows:
            raise ApplicationNotVerified("no verified application for this saga")
        verified = _verified_columns(saga_id, *rows[0][0:6])
        card_status, card_not_after = rows[0][6:8]
        if card_status is None:
            raise CertificateNotFound("the application's card certificate is gone")
        existing = [
            ExistingCertificate(
                serial=serial,
                cert_type=CertType(cert_type),
                se_cin=se_cin or "",
                status=Status(status),
                expired=read_time(not_after) <= now,
            )
            for serial, cert_type, se_cin, status, not_after in (row[8:13] for row in rows)
            if serial is not None
        ]
        card_usable = Status(card_status) is Status.VALID and read_time(card_not_after) > now
        return decide_branch(verified.se.cin, existing, card_usable=card_usable)

    # ---------------------------------------------------------------- phone certificates

    async def issue(
        self,
        saga_id: str,
        requests: Sequence[KeyRequest],
        *,
        conn: AsyncConnection | None = None,
    ) -> list[IssuedCertificate]:
        """FLOWS §1 step 9: one or two phone certificates, idempotent by (saga, type).

        Without ``conn``: a short transaction reads and checks (``plan_issue``), the
        certificates are signed with no transaction open (``sign_issue``), and a second short
        transaction checks again and stores them (``store_issue``). The certificates leave
        the CA only after that commit, so a crash before it leaves nothing issued to account
        for. A concurrent duplicate of the request that stored first is found there: its
        certificates are the answer and ours are dropped unissued (on PostgreSQL the two race
        on the (saga, type) unique key; the loser stores again, which finds the winner's).
        With a caller's ``conn`` all three run in the caller's transaction.
        """
        if conn is not None:
            plan = await self.plan_issue(conn, saga_id, requests)
            await self.sign_issue([plan])
            return await self.store_issue(conn, plan)
        async with self._db.transaction() as read:
            plan = await self.plan_issue(read, saga_id, requests)
        await self.sign_issue([plan])
        try:
            async with self._db.transaction() as write:
                return await self.store_issue(write, plan)
        except IntegrityError:
            async with self._db.transaction() as write:
                return await self.store_issue(write, plan)

    async def plan_issue(
        self, conn: AsyncConnection, saga_id: str, requests: Sequence[KeyRequest]
    ) -> IssuePlan:
        """Issuance, part 1 of 3: read and check everything, proofs of possession included;
        raises every refusal. Draws the serials and subject ids of what is to be signed."""
        return _raise_refusal((await self.plan_issues(conn, [(saga_id, requests)]))[0])

    async def plan_issues(
        self, conn: AsyncConnection, requests: Sequence[tuple[str, Sequence[KeyRequest]]]
    ) -> list[IssuePlan | CaError]:
        """``plan_issue`` for several sagas with one read; each a plan or its refusal."""
        now = self._clock()
        states = await _read_issue_states(conn, [saga_id for saga_id, _ in requests], now)
        outcomes: list[IssuePlan | CaError] = []
        for saga_id, saga_requests in requests:
            try:
                outcomes.append(self._plan(saga_id, saga_requests, states.get(saga_id), now))
            except CaError as refusal:
                outcomes.append(refusal)
        return outcomes

    def _plan(
        self,
        saga_id: str,
        requests: Sequence[KeyRequest],
        state: IssueState | CaError | None,
        now: datetime,
    ) -> IssuePlan:
        types = [request.cert_type for request in requests]
        if not requests or len(set(types)) != len(types):
            raise InvalidRequest("ask for one or two distinct certificate types")
        state = _raise_refusal(state)
        plan = IssuePlan(
            saga_id=saga_id,
            verified=state.verified,
            card_serial=state.verified.card_serial,
            now=now,
            order=types,
        )
        for request in requests:
            if request.cert_type not in state.verified.certificates:
                raise InvalidRequest(
                    f"the application did not ask for a {request.cert_type.value} certificate"
                )
            stored = state.stored.get(request.cert_type)
            if stored is not None:
                plan.results[request.cert_type] = self._stored_answer(stored, request)
                continue
            key = verify_proof_of_possession(
                request.cert_type, request.public_key_der, request.challenge, request.proof
            )
            state.require_usable_card()
            issuer = self.issuer(request.cert_type.ca_kind)
            plan.to_sign.append(
                PendingCertificate(
                    cert_type=request.cert_type,
                    template=self._template(request.cert_type, issuer, state),
                    public_key=key,
                    serial=self._serial(),
                    common_name=self._opaque_id(),
                    # whole seconds: what the certificate says is what the store says
                    not_before=now.replace(microsecond=0),
                    # DOMAIN §2: a phone certificate expires with its card certificate
                    not_after=state.card_not_after.replace(microsecond=0),
                )
            )
        return plan

    async def sign_issue(self, plans: Sequence[IssuePlan]) -> None:
        """Issuance, part 2 of 3: sign every certificate of ``plans`` not signed yet on the
        signing threads, touching no storage. Each thread takes the next certificate until
        none is left, so a thread the machine holds back does not hold the others up."""
        pending = deque(item for plan in plans for item in plan.to_sign if not item.der)
        if not pending:
            return

        def sign_until_done() -> None:
            while True:
                try:
                    item = pending.popleft()  # deque pops are thread-safe
                except IndexError:
                    return
                item.der = item.template.issue(
                    public_key=item.public_key,
                    serial=item.serial,
                    common_name=item.common_name,
                    not_before=item.not_before,
                    not_after=item.not_after,
                )

        loop = asyncio.get_running_loop()
        threads = min(self._signing_threads, len(pending))
        await asyncio.gather(
            *(loop.run_in_executor(self._signer, sign_until_done) for _ in range(threads))
        )

    async def store_issue(self, conn: AsyncConnection, plan: IssuePlan) -> list[IssuedCertificate]:
        """Issuance, part 3 of 3: check again what may have changed since the plan (the card
        revoked, a duplicate of this request stored first) and store what was signed; the
        answer in request order."""
        return _raise_refusal((await self.store_issues(conn, [plan]))[0])

    async def store_issues(
        self, conn: AsyncConnection, plans: Sequence[IssuePlan]
    ) -> list[list[IssuedCertificate] | CaError]:
        """``store_issue`` for plans of distinct sagas, with one read and one insert; each
        an answer or its refusal."""
        to_store = [plan for plan in plans if plan.to_sign]
        states = (
            await _read_issue_states(conn, [plan.saga_id for plan in to_store], self._clock())
            if to_store
            else {}
        )
        rows: list[tuple[Any, ...]] = []
        outcomes: list[list[IssuedCertificate] | CaError] = []
        stored: list[IssuePlan] = []
        for plan in plans:
            try:
                if plan.to_sign:
                    plan_rows = self._rows_to_store(conn.dialect, plan, states.get(plan.saga_id))
                    rows += plan_rows
                    if plan_rows:
                        stored.append(plan)
                outcomes.append(plan.answer())
            except CaError as refusal:
                outcomes.append(refusal)
        for chunk in chunks(rows, 500):
            await execute_many(conn, INSERT_CERTIFICATE, chunk)
        for plan in stored:
            log.info(
                "ca.phone_issued",
                saga_id=plan.saga_id,
                se=plan.verified.se.cin,
                serials=[plan.results[item.cert_type].serial for item in plan.to_sign],
            )
        return outcomes

    def _rows_to_store(
        self, dialect: Dialect, plan: IssuePlan, state: IssueState | CaError | None
    ) -> list[tuple[Any, ...]]:
        """The rows of the signed certificates of ``plan`` that nothing stored yet (filling
        ``plan.results``), after checking the card again."""
        state = _raise_refusal(state)
        rows: list[tuple[Any, ...]] = []
        for item in plan.to_sign:
            stored = state.stored.get(item.cert_type)
            if stored is not None:  # a duplicate stored first: its certificate is the answer
                plan.results[item.cert_type] = self._stored_answer(stored, item)
                continue
            state.require_usable_card()
            if not item.der:
                raise RuntimeError("store_issue before sign_issue")
            issuer = item.template.issuer
            plan.results[item.cert_type] = IssuedCertificate(
                serial=serial_hex(item.serial),
                cert_type=item.cert_type,
                der=item.der,
                not_after=item.not_after,
                ca_der=issuer.der,
            )
            rows.append(
                certificate_row(
                    dialect,
                    serial=serial_hex(item.serial),
                    ca_kind=issuer.kind.value,
                    ca_generation=issuer.generation,
                    holder=Holder.PHONE.value,
                    cert_type=item.cert_type.value,
                    person_id=plan.verified.person_id,
                    se_cin=plan.verified.se.cin,
                    card_serial=plan.card_serial,
                    saga_id=plan.saga_id,
                    status=Status.VALID.value,
                    reason=None,
                    cause=None,
                    status_changed_at=None,
                    not_before=item.not_before,
                    not_after=item.not_after,
                    issued_at=plan.now,
                    der=item.der,
                )
            )
        return rows

    def _stored_answer(
        self, stored: StoredCertificate, request: KeyRequest | PendingCertificate
    ) -> IssuedCertificate:
        """The certificate this saga already has of a type, if it certifies the same key."""
        certificate = x509.load_der_x509_certificate(stored.der)
        requested = (
            request.public_key_der
            if isinstance(request, KeyRequest)
            else request.public_key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        if _spki(certificate) != requested:
            raise InvalidRequest("this saga already certified another key of this type")
        return self._issued(
            certificate, stored.cert_type, self.issuer(stored.ca_kind, stored.ca_generation)
        )

    def _template(
        self, cert_type: CertType, issuer: Issuer, state: IssueState
    ) -> EndEntityTemplate:
        """The phone certificate profile for this issuer (and, for a signing certificate,
        the card signing certificate whose facts and localities it copies), cached."""
        key = (
            issuer.kind,
            issuer.generation,
            state.verified.card_serial if cert_type is CertType.SIGN else "",
        )
        template = self._templates.get(key)
        if template is not None:
            self._templates.move_to_end(key)
            return template
        if cert_type is CertType.SIGN:
            card_cert = x509.load_der_x509_certificate(state.card_der)
            # the four basic facts and the localities come from the card signing certificate
            localities = [a.value for a in card_cert.subject if a.oid == x509.NameOID.LOCALITY_NAME]
            if len(localities) != 2:
                raise InvalidRequest("the card signing certificate lacks prefecture and city")
            template = end_entity_template(
                issuer,
                cert_type,
                sign_subject_rdns(str(localities[0]), str(localities[1])),
                subject_alt_name=card_cert.extensions.get_extension_for_class(
                    x509.SubjectAlternativeName
                ).value,
            )
        else:
            template = end_entity_template(issuer, cert_type, auth_subject_rdns())
        _remember(self._templates, key, template)
        return template

    def _issued(
        self, cert: x509.Certificate, cert_type: CertType, issuer: Issuer
    ) -> IssuedCertificate:
        return IssuedCertificate(
            serial=serial_hex(cert.serial_number),
            cert_type=cert_type,
            der=cert.public_bytes(serialization.Encoding.DER),
            not_after=cert.not_valid_after_utc,
            ca_der=issuer.der,
        )

    async def _insert_certificate(
        self,
        conn: AsyncConnection,
        cert: x509.Certificate,
        issuer: Issuer,
        holder: Holder,
        person_id: str,
        se_cin: str | None,
        card_serial: str | None,
        saga_id: str | None,
        now: datetime,
    ) -> None:
        await conn.execute(
            insert(t.certificates),
            [_certificate_row(cert, issuer, holder, person_id, se_cin, card_serial, saga_id, now)],
        )

    # ---------------------------------------------------------------- statuses

    async def certificate(
        self, serial: str, *, conn: AsyncConnection | None = None
    ) -> CertificateRecord:
        async with self._tx(conn) as conn:
            record = await self._certificate(conn, serial.upper().zfill(40))
        if record is None:
            raise CertificateNotFound("no certificate with this serial")
        return record

    async def certificates(
        self,
        *,
        person_id: str | None = None,
        se_cin: str | None = None,
        holder: Holder | None = None,
    ) -> list[CertificateRecord]:
        query = select(t.certificates).order_by(t.certificates.c.issued_at, t.certificates.c.serial)
        if person_id is not None:
            query = query.where(t.certificates.c.person_id == person_id)
        if se_cin is not None:
            query = query.where(t.certificates.c.se_cin == se_cin)
        if holder is not None:
            query = query.where(t.certificates.c.holder == holder.value)
        async with self._db.transaction() as conn:
            rows = (await conn.execute(query)).all()
        return [CertificateRecord.from_row(row) for row in rows]

    async def live_phone_certificates(
        self, se_cin: str, *, conn: AsyncConnection | None = None
    ) -> list[CertificateRecord]:
        """The phone certificates on an SE that are not revoked (valid or held), by serial."""
        async with self._tx(conn) as conn:
            records = await self._active_certificates(conn, se_cin=se_cin, holder=Holder.PHONE)
        return sorted(records, key=lambda record: record.serial)

    async def _certificate(self, conn: AsyncConnection, serial: str) -> CertificateRecord | None:
        row = (
            await conn.execute(select(t.certificates).where(t.certificates.c.serial == serial))
        ).first()
        return None if row is None else CertificateRecord.from_row(row)

    async def _active_certificates(
        self,
        conn: AsyncConnection,
        *,
        person_id: str | None = None,
        se_cin: str | None = None,
        holder: Holder | None = None,
        card_serial: str | None = None,
    ) -> list[CertificateRecord]:
        conditions = [t.certificates.c.status != Status.REVOKED.value]
        if person_id is not None:
            conditions.append(t.certificates.c.person_id == person_id)
        if se_cin is not None:
            conditions.append(t.certificates.c.se_cin == se_cin)
        if holder is not None:
            conditions.append(t.certificates.c.holder == holder.value)
        if card_serial is not None:
            conditions.append(t.certificates.c.card_serial == card_serial)
        rows = (await conn.execute(select(t.certificates).where(and_(*conditions)))).all()
        return [CertificateRecord.from_row(row) for row in rows]

    async def change_status(
        self,
        serial: str,
        target: Status,
        cause: Cause,
        *,
        conn: AsyncConnection | None = None,
    ) -> list[StatusChange]:
        """Hold, release or revoke one certificate (with cascades); returns every change."""
        now = self._clock()
        async with self._tx(conn) as conn:
            record = await self._certificate(conn, serial.upper().zfill(40))
            if record is None:
                raise CertificateNotFound("no certificate with this serial")
            return await self._apply(conn, record, target, cause, now)

    async def hold(
        self,
        serial: str,
        cause: Cause = Cause.TEMPORARY_LOSS,
        *,
        conn: AsyncConnection | None = None,
    ) -> list[StatusChange]:
        return await self.change_status(serial, Status.HELD, cause, conn=conn)

    async def release(
        self, serial: str, cause: Cause = Cause.FOUND, *, conn: AsyncConnection | None = None
    ) -> list[StatusChange]:
        return await self.change_status(serial, Status.VALID, cause, conn=conn)

    async def revoke(
        self, serial: str, cause: Cause, *, conn: AsyncConnection | None = None
    ) -> list[StatusChange]:
        return await self.change_status(serial, Status.REVOKED, cause, conn=conn)

    async def change_status_of(
        self,
        target: Status,
        cause: Cause,
        *,
        se_cin: str | None = None,
        person_id: str | None = None,
        cert_types: Sequence[CertType] = (CertType.AUTH, CertType.SIGN),
        conn: AsyncConnection | None = None,
    ) -> list[StatusChange]:
        """The same for every phone certificate on an SE or of a person that is not revoked."""
        if se_cin is None and person_id is None:
            raise InvalidRequest("name an SE or a person")
        now = self._clock()
        changes: list[StatusChange] = []
        async with self._tx(conn) as conn:
            records = await self._active_certificates(
                conn, person_id=person_id, se_cin=se_cin, holder=Holder.PHONE
            )
            for record in records:
                if record.cert_type not in cert_types:
                    continue
                if target is Status.VALID and record.status is not Status.HELD:
                    continue  # releasing "all on this SE" touches only the held ones
                changes += await self._apply(conn, record, target, cause, now)
        return changes

    async def _apply(
        self,
        conn: AsyncConnection,
        record: CertificateRecord,
        target: Status,
        cause: Cause,
        now: datetime,
    ) -> list[StatusChange]:
        _check_cause(target, cause)
        if record.status is target:
            if target is not Status.VALID or record.cause == cause.value:
                return [_change(record, target, record.reason, changed=False)]
        if record.status is Status.REVOKED:
            raise InvalidTransition("a revoked certificate stays revoked")
        if target is Status.VALID and record.status is not Status.HELD:
            raise InvalidTransition("only a held certificate can be released")
        reason = None if target is Status.VALID else REASON_FOR_CAUSE[cause].name
        await conn.execute(
            update(t.certificates)
            .where(t.certificates.c.serial == record.serial)
            .values(status=target.value, reason=reason, cause=cause.value, status_changed_at=now)
        )
        await conn.execute(
            update(t.ca_generations)
            .where(
                t.ca_generations.c.kind == record.ca_kind.value,
                t.ca_generations.c.generation == record.ca_generation,
            )
            .values(crl_dirty=True)
        )
        log.info(
            "ca.status_changed",
            serial=record.serial,
            holder=record.holder.value,
            cert_type=record.cert_type.value,
            status=target.value,
            cause=cause.value,
            reason=reason,
        )
        changes = [_change(record, target, reason, changed=True)]
        if record.holder is Holder.CARD and target is Status.REVOKED:
            changes += await self._cascade(conn, record, cause, now)
        return changes

    async def _cascade(
        self, conn: AsyncConnection, card: CertificateRecord, cause: Cause, now: datetime
    ) -> list[StatusChange]:
        """Card signing certificate revoked → the phone signing certificates issued from it;
        card renewed → every phone certificate issued from the old card (DOMAIN §2, FLOWS §4)."""
        if card.cert_type is not CertType.SIGN:
            return []  # phone certificates link to the card signing certificate
        phone_cause = (
            Cause.CARD_RENEWED if cause is Cause.CARD_RENEWED else Cause.CARD_FACTS_CHANGED
        )
        types = {CertType.AUTH, CertType.SIGN} if cause is Cause.CARD_RENEWED else {CertType.SIGN}
        changes: list[StatusChange] = []
        for record in await self._active_certificates(
            conn, card_serial=card.serial, holder=Holder.PHONE
        ):
            if record.cert_type in types:
                changes += await self._apply(conn, record, Status.REVOKED, phone_cause, now)
        return changes

    # ---------------------------------------------------------------- CRL and OCSP

    async def crl(self, kind: CaKind, generation: int | None = None) -> bytes:
        """The current complete CRL of a CA generation (DER); a new one, with the next CRL
        number, when a status changed since the last or the last is past half its life."""
        issuer = self.issuer(kind, generation)
        now = self._clock()
        async with self._db.transaction() as conn:
            row = (
                await conn.execute(
                    select(t.ca_generations).where(
                        t.ca_generations.c.kind == kind.value,
                        t.ca_generations.c.generation == issuer.generation,
                    )
                )
            ).one()
            if row.crl is not None and not row.crl_dirty:
                current = x509.load_der_x509_crl(row.crl)
                if now < current.last_update_utc + CRL_VALIDITY / 2:
                    return row.crl
            entries = [
                RevokedEntry(
                    serial=int(r.serial, 16),
                    revoked_at=utc(r.status_changed_at),
                    reason=x509.ReasonFlags[r.reason],
                )
                for r in (
                    await conn.execute(
                        select(t.certificates).where(
                            t.certificates.c.ca_kind == kind.value,
                            t.certificates.c.ca_generation == issuer.generation,
                            t.certificates.c.status != Status.VALID.value,
                        )
                    )
                ).all()
            ]
            number = row.crl_number + 1
            crl = build_crl(
                issuer, entries, number=number, this_update=now, next_update=now + CRL_VALIDITY
            ).public_bytes(serialization.Encoding.DER)
            await conn.execute(
                update(t.ca_generations)
                .where(
                    t.ca_generations.c.kind == kind.value,
                    t.ca_generations.c.generation == issuer.generation,
                    t.ca_generations.c.crl_number == row.crl_number,  # monotonic across replicas
                )
                .values(crl_number=number, crl=crl, crl_dirty=False)
            )
        log.info(
            "ca.crl_published",
            kind=kind.value,
            generation=issuer.generation,
            number=number,
            entries=len(entries),
        )
        return crl

    async def ocsp(self, request_der: bytes) -> bytes:
        """An RFC 6960 response (DER) to a DER OCSP request; never raises on bad input."""
        try:
            request = ocsp.load_der_ocsp_request(request_der)
            algorithm = request.hash_algorithm
            serial = request.serial_number
            request.extensions  # noqa: B018 - parse now: a bad extension is a bad request
        except (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension):
            return _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        issuer = next(
            (
                candidate
                for candidate in self._issuers.values()
                if issuer_key_hash(candidate.certificate, algorithm) == request.issuer_key_hash
            ),
            None,
        )
        if issuer is None:
            return _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
        async with self._db.transaction() as conn:
            record = await self._certificate(conn, serial_hex(serial))
        if (
            record is None
            or record.ca_kind is not issuer.kind
            or record.ca_generation != issuer.generation
        ):
            answer = OcspAnswer(ocsp.OCSPCertStatus.UNKNOWN)
        elif record.status is Status.VALID:
            answer = OcspAnswer(ocsp.OCSPCertStatus.GOOD)
        else:
            answer = OcspAnswer(
                ocsp.OCSPCertStatus.REVOKED,
                revoked_at=record.status_changed_at,
                reason=x509.ReasonFlags[record.reason] if record.reason else None,
            )
        response = build_ocsp_response(
            issuer, request, answer, this_update=self._clock(), validity=OCSP_VALIDITY
        )
        return response.public_bytes(serialization.Encoding.DER)

    # ---------------------------------------------------------------- export

    async def export(self, out: Path) -> dict[str, int]:
        """Every CA certificate, current CRLs, every issued certificate (PEM) and an index."""
        files: dict[str, bytes] = {}
        for issuer in self.generations():
            stem = f"{issuer.kind.value}-g{issuer.generation}"
            files[f"ca/{stem}.pem"] = issuer.certificate.public_bytes(serialization.Encoding.PEM)
            crl = x509.load_der_x509_crl(await self.crl(issuer.kind, issuer.generation))
            files[f"crl/{stem}.crl.pem"] = crl.public_bytes(serialization.Encoding.PEM)
        records = await self.certificates()
        lines = ["serial\tholder\ttype\tca_generation\tstatus\treason\tse\tperson\tnot_after"]
        for record in records:
            cert = x509.load_der_x509_certificate(record.der)
            files[f"certs/{record.serial}.pem"] = cert.public_bytes(serialization.Encoding.PEM)
            fields = [
                record.serial,
                record.holder.value,
                record.cert_type.value,
                str(record.ca_generation),
                record.status.value,
                record.reason or "",
                record.se_cin or "",
                record.person_id,
                record.not_after.isoformat(),
            ]
            lines.append("\t".join(fields))
        files["index.tsv"] = ("\n".join(lines) + "\n").encode()
        await asyncio.to_thread(_write_files, out, files)
        return {"ca": len(self._issuers), "crl": len(self._issuers), "certificates": len(records)}


def _fifth_birthday_after(born: date, now: datetime) -> datetime:
    today = now.date()
    year = today.year + 5 if (today.month, today.day) >= (born.month, born.day) else today.year + 4
    day = born.day
    if born.month == 2 and born.day == 29:
        day = 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return datetime(year, born.month, day, tzinfo=UTC)


def _verified_from(
    application: Application, saga_id: str, person_id: str, card_serial: str
) -> VerifiedApplication:
    return VerifiedApplication(
        saga_id=saga_id,
        person_id=person_id,
        se=application.se,
        card_serial=card_serial,
        certificates=tuple(sorted(set(application.certificates))),
        pin_option=application.pin_option,
    )


def _check_cause(target: Status, cause: Cause) -> None:
    if target is Status.HELD and cause not in HOLD_CAUSES:
        raise InvalidRequest(f"{cause.value} is not a reason to hold a certificate")
    if target is Status.VALID and cause not in RELEASE_CAUSES:
        raise InvalidRequest(f"{cause.value} is not a reason to release a certificate")
    if target is Status.REVOKED and (cause in HOLD_CAUSES or cause in RELEASE_CAUSES):
        raise InvalidRequest(f"{cause.value} is not a reason to revoke a certificate")


def _change(
    record: CertificateRecord, status: Status, reason: str | None, *, changed: bool
) -> StatusChange:
    return StatusChange(
        serial=record.serial,
        cert_type=record.cert_type,
        holder=record.holder,
        status=status,
        reason=reason,
        changed=changed,
    )


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER
    )


def _write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass
class PendingCertificate:
    """One certificate to sign: drawn serial and subject id, then, once signed, its DER."""

    cert_type: CertType
    template: EndEntityTemplate
    public_key: rsa.RSAPublicKey
    serial: int
    common_name: str
    not_before: datetime
    not_after: datetime
    der: bytes = b""  # set by sign_issue


@dataclass
class IssuePlan:
    """What one issuance found (read), must sign, and signed."""

    saga_id: str
    verified: VerifiedApplication
    card_serial: str
    now: datetime
    order: list[CertType]
    results: dict[CertType, IssuedCertificate] = field(default_factory=dict)
    to_sign: list[PendingCertificate] = field(default_factory=list)

    def answer(self) -> list[IssuedCertificate]:
        return [self.results[cert_type] for cert_type in self.order]


@dataclass(frozen=True, slots=True)
class StoredCertificate:
    cert_type: CertType
    serial: str
    ca_kind: CaKind
    ca_generation: int
    der: bytes


@dataclass(frozen=True, slots=True)
class IssueState:
    """What issuance reads: the verified application, its card certificate, and the
    certificates the saga already has."""

    verified: VerifiedApplication
    card_status: Status
    card_not_after: datetime
    card_der: bytes
    stored: dict[CertType, StoredCertificate]
    now: datetime

    def require_usable_card(self) -> None:
        if self.card_status is not Status.VALID:
            raise CardCertificateRevoked("the card certificate is no longer valid")
        if self.card_not_after <= self.now:
            raise CardCertificateExpired("the card certificate has expired")


async def _read_issue_states(
    conn: AsyncConnection, saga_ids: Sequence[str], now: datetime
) -> dict[str, IssueState | CaError]:
    """What issuance reads, for each of ``saga_ids`` that has a verified application."""
    grouped: dict[str, list[Any]] = {}
    for chunk in chunks(list(dict.fromkeys(saga_ids)), 500):
        for row in await fetch(conn, ISSUE_READ + in_list(len(chunk)), tuple(chunk)):
            grouped.setdefault(row[0], []).append(row)
    read_time = time_columns(conn.dialect).read
    states: dict[str, IssueState | CaError] = {}
    for saga_id, rows in grouped.items():
        card_status, card_not_after, card_der = rows[0][7:10]
        if card_status is None:
            states[saga_id] = CertificateNotFound("the application's card certificate is gone")
            continue
        states[saga_id] = IssueState(
            verified=_verified_columns(saga_id, *rows[0][1:7]),
            card_status=Status(card_status),
            card_not_after=read_time(card_not_after),
            card_der=card_der,
            stored={
                CertType(row[10]): StoredCertificate(
                    cert_type=CertType(row[10]),
                    serial=row[11],
                    ca_kind=CaKind(row[12]),
                    ca_generation=row[13],
                    der=row[14],
                )
                for row in rows
                if row[11] is not None
            },
            now=now,
        )
    return states


def _raise_refusal(outcome: _T | CaError | None) -> _T:
    """``outcome`` unless it is a refusal; no state read at all means no verified application."""
    if outcome is None:
        raise ApplicationNotVerified("no verified application for this saga")
    if isinstance(outcome, CaError):
        raise outcome
    return outcome


def _remember(cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    cache[key] = value
    if len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


def _certificate_row(
    cert: x509.Certificate,
    issuer: Issuer,
    holder: Holder,
    person_id: str,
    se_cin: str | None,
    card_serial: str | None,
    saga_id: str | None,
    now: datetime,
) -> dict[str, Any]:
    return {
        "serial": serial_hex(cert.serial_number),
        "ca_kind": issuer.kind.value,
        "ca_generation": issuer.generation,
        "holder": holder.value,
        "cert_type": issuer.kind.value,
        "person_id": person_id,
        "se_cin": se_cin,
        "card_serial": card_serial,
        "saga_id": saga_id,
        "status": Status.VALID.value,
        "reason": None,
        "cause": None,
        "status_changed_at": None,
        "not_before": cert.not_valid_before_utc,
        "not_after": cert.not_valid_after_utc,
        "issued_at": now,
        "der": cert.public_bytes(serialization.Encoding.DER),
    }


def _verified_row(row: Any) -> VerifiedApplication:
    return _verified_columns(
        row.saga_id,
        row.person_id,
        row.se_cin,
        row.se_kdd,
        row.card_serial,
        row.cert_types,
        row.pin_option,
    )


def _verified_columns(
    saga_id: str,
    person_id: str,
    se_cin: str,
    se_kdd: str,
    card_serial: str,
    cert_types: str,
    pin_option: int | None,
) -> VerifiedApplication:
    """A verified application from its stored columns (``ca_applications``, in order)."""
    return VerifiedApplication(
        saga_id=saga_id,
        person_id=person_id,
        se=SeIdentity(cin=se_cin, kdd=se_kdd),
        card_serial=card_serial,
        certificates=tuple(CertType(c) for c in cert_types.split(",")),
        pin_option=pin_option,
    )


@dataclass(frozen=True, slots=True)
class CardSeen:
    """What verification needs of the card certificate an application names."""

    holder: Holder
    cert_type: CertType
    person_id: str
    status: Status
    not_before: datetime
    not_after: datetime
    der: bytes


@dataclass(frozen=True, slots=True)
class VerificationState:
    """What verification reads: the card certificate, who used the nonce (saga and
    application digest) and the saga's verified application; ``None`` where there is none."""

    card: CardSeen | None
    nonce_used_by: tuple[str, str] | None
    verified: VerifiedApplication | None


async def _read_verification(
    conn: AsyncConnection, card_serial: str, nonce_hex: str, saga_id: str
) -> VerificationState:
    (row,) = await fetch(conn, VERIFY_READ, (card_serial, nonce_hex, saga_id))
    read_time = time_columns(conn.dialect).read
    card = None
    if row[0] is not None:
        card = CardSeen(
            holder=Holder(row[0]),
            cert_type=CertType(row[1]),
            person_id=row[2],
            status=Status(row[3]),
            not_before=read_time(row[4]),
            not_after=read_time(row[5]),
            der=row[6],
        )
    return VerificationState(
        card=card,
        nonce_used_by=None if row[7] is None else (row[7], row[8]),
        verified=None if row[9] is None else _verified_columns(saga_id, *row[9:15]),
    )
