"""A world for the life-cycle flows: every real part in this process — the orchestrator with
issuance and the life-cycle flows, the SP-TSM and CA workers, phones (SE + app + user) and
their owners' My Number Cards — on the embedded default (in-process transport and phone
link, SQLite) or on RabbitMQ + Mosquitto + PostgreSQL (``Services``).

It lets a test look where the issue says to look after every flow: the phone (applet, keys,
PIN states), the TSM registry, and the CA (OCSP, through the CA's own responder code).
"""

from __future__ import annotations

import asyncio
import atexit
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from device_sim.app import AppStorage, DeviceInfo
from device_sim.fleet import CaCardFactory, Person, make_person
from device_sim.lifecycle_app import LifecycleApp, LifecycleCore, LifecycleUser
from device_sim.se.element import SecureElement
from device_sim.se.jpki_applet import GeneratedKeys, JpkiApplet, JpkiAppletFactory, Profile
from infra.bus import Bus
from infra.db.outbox import outgoing
from infra.transport.base import Transport
from infra.transport.phone_link import InProcessPhoneHub, PhoneLink
from jpki.run import Services, local_secret, make_tsm_worker, open_transport, tsm_key_ring
from orchestrator import callcentre
from orchestrator import lifecycle_messages as lm
from orchestrator import messages as om
from orchestrator.flows.issuance import issuance
from orchestrator.flows.lifecycle import lifecycle_flows
from orchestrator.saga.machine import TERMINAL
from orchestrator.service import Orchestrator
from protocol import jpki as jp
from protocol.envelope import build
from workers.ca.authority import CertificateAuthority
from workers.ca.keystore import Passphrase
from workers.ca.profiles import CaKind
from workers.ca.service import CaWorker
from workers.tsm.provisioning import manufacture_secure_element
from workers.tsm.registry import SeRecord, SqlRegistry

OPERATOR = "desk-7"
OPERATOR_KEY = bytes(range(32))


@dataclass(eq=False)
class SimPhone:
    device_id: str
    device: DeviceInfo
    se: SecureElement
    app: LifecycleApp | None = None
    link: PhoneLink | None = None
    new_ids: list[str] = field(default_factory=list)

    @property
    def se_identity(self) -> om.SeIdentity:
        identity = self.se.identity
        return om.SeIdentity(cin=identity.cin.hex().upper(), kdd=identity.kdd.hex().upper())

    @property
    def phone(self) -> lm.Phone:
        return lm.Phone(device_id=self.device_id, se=self.se_identity)

    def applet(self) -> JpkiApplet | None:
        app = next((a for a in self.se.manager.applications.values() if a.aid == jp.AID), None)
        return app.applet if app is not None and isinstance(app.applet, JpkiApplet) else None

    def certificate(self, kind: om.CertificateKind) -> x509.Certificate | None:
        applet = self.applet()
        ef = jp.EF.AUTH_CERT if kind is om.CertificateKind.AUTH else jp.EF.SIGN_CERT
        der = applet.files.get(ef) if applet else None
        return x509.load_der_x509_certificate(der) if der else None

    def pin_state(self, kind: om.CertificateKind) -> jp.PinStatus | None:
        applet = self.applet()
        ef = jp.EF.AUTH_PIN if kind is om.CertificateKind.AUTH else jp.EF.SIGN_PIN
        return applet.pin_status(ef) if applet else None


@dataclass(eq=False)
class World:
    data_dir: Path
    transport: Transport
    ca: CertificateAuthority
    orchestrator: Orchestrator
    tsm_db: Any
    cards: CaCardFactory
    make_link: Any
    operator: callcentre.CallCentre
    rng: random.Random
    ring: Any
    phones: list[SimPhone] = field(default_factory=list)
    people: int = 0
    last_person: Person | None = field(default=None, repr=False)

    # -- people, phones, apps ----------------------------------------------------------------

    async def person(self) -> Person:
        index = self.people
        self.people += 1
        person = await asyncio.to_thread(make_person, index, self.rng, self.cards.issuer_for,
                                         GeneratedKeys())
        await self.cards.record()
        self.last_person = person
        return person

    def phone(self, model: str = "Pixel 9") -> SimPhone:
        index = len(self.phones)
        device_id = f"lc-{uuid.uuid4().hex[:8]}-{index}"
        cin = bytes.fromhex("C1C2C3C4") + index.to_bytes(2, "big") + self.rng.randbytes(4)
        se = manufacture_secure_element(self.ring, cin,
                                        JpkiAppletFactory(Profile.PHONE, GeneratedKeys()),
                                        random=self.rng.randbytes)
        phone = SimPhone(device_id, DeviceInfo(device_id, model, "Android", "15", True), se)
        self.phones.append(phone)
        return phone

    async def open_app(self, phone: SimPhone, person: Person, *,
                       storage: AppStorage | None = None,
                       user: LifecycleUser | None = None) -> LifecycleApp:
        """The app started on ``phone`` (a new install unless ``storage`` is given) and its
        link connected; an idle app reports itself online (``online.py``)."""
        await self.close_app(phone)

        def new_id() -> str:
            value = uuid.uuid4().hex
            phone.new_ids.append(value)
            return value

        core = LifecycleCore(phone.device, phone.se, phone.se_identity, storage, new_id=new_id)
        user = user or LifecycleUser(person.script("both", om.PinOption.INITIAL_STATE, False),
                                     person.card)
        link = self.make_link(phone.device_id)
        app = LifecycleApp(core, user, link)
        await link.start(app.deliver)
        phone.app, phone.link = app, link
        return app

    async def connect(self, phone: SimPhone) -> str | None:
        """The app reports itself online; returns the clean-up saga's id, once it ended."""
        assert phone.app is not None
        before = len(phone.new_ids)
        await phone.app.connected()
        if len(phone.new_ids) == before:
            return None
        saga_id = phone.new_ids[-1]
        await self.wait(saga_id)
        return saga_id

    async def close_app(self, phone: SimPhone) -> None:
        """The phone goes offline (messages to it wait, as a persistent session's do)."""
        if phone.link is not None:
            await phone.link.close()
        phone.link = None

    # -- the call centre ---------------------------------------------------------------------

    def request_fields(self) -> dict[str, Any]:
        return {"request_id": uuid.uuid4().hex, "operator": OPERATOR,
                "issued_at": datetime.now(UTC)}

    async def report(self, request: lm.CallCentreRequest, *, wait: bool = True) -> Any:
        saga_id = await self.operator.submit(request)
        return await self.wait(saga_id) if wait else saga_id

    async def report_as_is(self, request: lm.CallCentreRequest) -> Any:
        """Publish a request with whatever MAC it carries (a forgery, in tests)."""
        message = build(request, saga_id=request.request_id)
        await self.transport.publish([outgoing(message)])
        return await self.wait(request.request_id)

    # -- looking -----------------------------------------------------------------------------

    async def wait(self, saga_id: str, within: float = 180.0, *, status: str | None = None) -> Any:
        """The saga's view once it ended (or reached ``status`` / is waiting for an event)."""
        deadline = time.monotonic() + within
        view = None
        while time.monotonic() < deadline:
            try:
                view = await self.orchestrator.engine.get(saga_id)
            except Exception:  # noqa: BLE001 - not started yet
                view = None
            if view is not None:
                if view.status in TERMINAL and status is None:
                    return view
                if status is not None and (view.status == status or view.waiting == status):
                    return view
            await asyncio.sleep(0.02)
        raise AssertionError(f"saga {saga_id} did not get there: {view}")

    async def ocsp(self, certificate: x509.Certificate) -> tuple[str, str | None]:
        """The CA's OCSP answer: ("good" | "revoked" | "unknown", reason name)."""
        issuers = [self.ca.issuer(kind).certificate for kind in (CaKind.AUTH, CaKind.SIGN)]
        issuer = next(c for c in issuers if c.subject == certificate.issuer)
        request = ocsp.OCSPRequestBuilder().add_certificate(
            certificate, issuer, hashes.SHA256()).build()
        answer = ocsp.load_der_ocsp_response(await self.ca.ocsp(request.public_bytes(Encoding.DER)))
        status = answer.certificate_status
        reason = answer.revocation_reason.name if answer.revocation_reason else None
        if status is ocsp.OCSPCertStatus.GOOD:
            return "good", None
        if status is ocsp.OCSPCertStatus.REVOKED:
            return "revoked", reason
        return "unknown", None

    async def registry(self, phone: SimPhone) -> SeRecord:
        return await SqlRegistry(self.tsm_db).get(phone.se_identity.cin)


# The embedded stack's starting files (CA keys and generations, TSM master keys, migrated
# empty SQLite stores), made once per test process: every world starts from a copy, which
# spares each test the CA's RSA key generation, the key file's scrypt and the migrations.
_template: Path | None = None


async def _start_from_template(data_dir: Path) -> None:
    global _template
    if _template is None:
        template = Path(tempfile.mkdtemp(prefix="jpki-lifecycle-"))
        atexit.register(shutil.rmtree, template, ignore_errors=True)
        async with lifecycle_world(template, use_template=False):
            pass
        _template = template
    await asyncio.to_thread(shutil.copytree, _template, data_dir, dirs_exist_ok=True)


@asynccontextmanager
async def lifecycle_world(
    data_dir: Path, services: Services | None = None, *, seed: int = 7,
    not_found_period_s: float = 3600.0, use_template: bool = True,
    on_transport: Callable[[Transport], Awaitable[None]] | None = None,
) -> AsyncIterator[World]:
    """Start every service of the stack in this process; stop them on the way out."""
    services = services or Services()
    if use_template and services == Services():
        await _start_from_template(data_dir)
    transport = await open_transport(services, "jpki-lifecycle")
    if on_transport is not None:
        await on_transport(transport)
    bus = Bus(transport)
    ca_db = services.database("ca", data_dir)
    ca = await CertificateAuthority.open(
        data_dir, Passphrase(local_secret(data_dir, "ca", "JPKI_CA_PASSPHRASE")), db=ca_db)
    ring = tsm_key_ring(data_dir)
    orchestrator_db = services.database("orchestrator", data_dir)
    tsm_db = services.database("tsm", data_dir)
    callcentre.configure(callcentre.OperatorKeys({OPERATOR: OPERATOR_KEY}))
    orchestrator = Orchestrator(orchestrator_db, transport,
                                flows=(issuance, *lifecycle_flows(not_found_period_s)),
                                rng=random.Random(seed))
    ca_worker = CaWorker(ca, transport)
    tsm_worker = await make_tsm_worker(tsm_db, transport, ring)
    hub: InProcessPhoneHub | None = None
    gateway: Any = None
    if services.mqtt_url is None:
        hub = InProcessPhoneHub(bus)
        make_link: Any = hub.link
    else:
        from infra.mqtt import MqttPhoneLink
        from workers.gateway.service import Gateway

        mqtt_url, root = services.mqtt_url, services.topic_root
        gateway = Gateway(transport, mqtt_url, topic_root=root)

        def make_link(device_id: str) -> Any:
            return MqttPhoneLink(mqtt_url, device_id, topic_root=root)

    world = World(data_dir, transport, ca, orchestrator, tsm_db, CaCardFactory(ca), make_link,
                  callcentre.CallCentre(transport, OPERATOR, OPERATOR_KEY),
                  random.Random(seed), ring)
    try:
        await orchestrator.start()
        await ca_worker.start()
        await tsm_worker.start()
        if hub is not None:
            await hub.start()
        if gateway is not None:
            await gateway.start()
        yield world
    finally:
        for phone in world.phones:
            if phone.link is not None:
                await phone.link.close(forget=True)
        if gateway is not None:
            await gateway.stop()
        if hub is not None:
            await hub.close()
        await tsm_worker.stop()
        await ca_worker.stop()
        await orchestrator.stop()
        await transport.close()
        await orchestrator_db.close()
        await tsm_db.close()
        await ca.close()


def real_services(amqp_vhost_url: str, mqtt_url: str, pg_url: str, unique: str) -> Services:
    """RabbitMQ (a vhost of its own), Mosquitto (a topic root of its own), PostgreSQL (a
    schema per service of its own)."""
    return Services(amqp_url=amqp_vhost_url, mqtt_url=mqtt_url, db_url=pg_url,
                    schema_suffix=f"_lc_{unique}", topic_root=f"jpki-lc-{unique}/dev")


async def drop_schemas(services: Services, data_dir: Path) -> None:
    for service in ("orchestrator", "tsm", "ca"):
        db = services.database(service, data_dir)
        await db.drop_schema()
        await db.close()
