"""One person through the whole life cycle: issue → PIN change → temporary loss → found →
model change → loss of the new phone → issue on a third phone → PIN reset → disposal, with
the OCSP status of every certificate they ever had checked after each stage, on the
embedded default and on RabbitMQ + Mosquitto + PostgreSQL. At the end every phone's SE is
clean or holds only live keys, and ``jpki audit`` finds nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from jpki import audit as audit_mod
from orchestrator import lifecycle_messages as lm
from protocol import jpki as jp
from protocol.envelope import InvalidMessage, decode
from protocol.errors import StatusWord
from tests.e2e.lifecycle_stories import (
    AUTH,
    GOOD,
    HELD,
    SIGN,
    applet_gone,
    certificates,
    issued,
    stale_applet_removed_on_reconnect,
    verify_on_se,
)
from tests.e2e.lifecycle_world import World, drop_schemas, lifecycle_world, real_services
from tests.e2e.secrets_scan import scan
from tests.e2e.test_issuance_e2e import Capture

pytestmark = pytest.mark.e2e

NEW_SIGNING_PASSWORD = "NEWPASS2024"  # noqa: S105 - a test user's choice
NEW_AUTH_PIN = "2580"


class Ledger:
    """Every certificate of the person, with the OCSP answer it must get now."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.expected: dict[int, tuple[str, x509.Certificate, tuple[str, str | None]]] = {}

    def add(self, label: str, certificate: x509.Certificate) -> None:
        self.expected[certificate.serial_number] = (label, certificate, GOOD)

    def expect(self, certificate: x509.Certificate, status: tuple[str, str | None]) -> None:
        label, _, _ = self.expected[certificate.serial_number]
        self.expected[certificate.serial_number] = (label, certificate, status)

    async def check(self, stage: str) -> None:
        seen = {label: await self.world.ocsp(c) for label, c, _ in self.expected.values()}
        wanted = {label: status for label, _, status in self.expected.values()}
        assert seen == wanted, f"after {stage}"


class UserEffort:
    """Screens the user saw and actions they took (inputs answered, card taps), per stage,
    measured from the simulated app (``docs/ux.md``)."""

    def __init__(self) -> None:
        self.stages: dict[str, tuple[int, int]] = {}
        self.screens: dict[str, list[str]] = {}  # the screens' ids, in order (printed)
        self._start: dict[int, tuple[int, int]] = {}

    def begin(self, app: Any) -> None:
        self._start[id(app)] = (len(app.core.screens_shown), app.user.actions)

    def whole(self, stage: str, app: Any) -> None:
        """All an app instance showed since it was opened."""
        self.stages[stage] = (len(app.core.screens_shown), app.user.actions)
        self.screens[stage] = [str(screen.id) for screen in app.core.screens_shown]

    def end(self, stage: str, app: Any) -> None:
        screens, actions = self._start.pop(id(app))
        self.stages[stage] = (len(app.core.screens_shown) - screens, app.user.actions - actions)
        self.screens[stage] = [str(screen.id) for screen in app.core.screens_shown[screens:]]


# docs/ux.md: (screens seen, user actions) per flow, as the simulated app measures them
UX = {
    "new issuance": (9, 8),
    "PIN change": (2, 4),
    "found: renew the signing certificate": (8, 6),
    "model change (new phone)": (9, 8),
    "old phone next online": (1, 1),
    "PIN reset": (8, 6),
    "disposal": (5, 3),
}


async def walk(world: World) -> dict[str, tuple[int, int]]:
    person = await world.person()
    ledger = Ledger(world)
    effort = UserEffort()

    # 1. issue on the first phone
    first, app = await issued(world, person)
    effort.whole("new issuance", app)
    one = certificates(first)
    ledger.add("first/auth", one[AUTH])
    ledger.add("first/sign", one[SIGN])
    await ledger.check("issue")

    # 2. PIN change (the signing password), local and recorded
    app.user.next_pins[SIGN] = NEW_SIGNING_PASSWORD
    effort.begin(app)
    assert (await app.change_pin(SIGN)).outcome == "done"
    effort.end("PIN change", app)
    assert verify_on_se(first, SIGN, NEW_SIGNING_PASSWORD) == StatusWord.OK
    await ledger.check("PIN change")

    # 3. temporary loss: both held, the not-found timer running
    await world.close_app(first)
    temporary = lm.TemporaryLossReport(**world.request_fields(), phone=first.phone)
    timer = await world.report(temporary, wait=False)
    await world.wait(timer, status="event")
    ledger.expect(one[AUTH], HELD)
    ledger.expect(one[SIGN], HELD)
    await ledger.check("temporary loss")

    # 4. found: auth released, sign revoked and reissued on the same SE
    app = await world.open_app(first, person, storage=app.core.storage, user=app.user)
    await world.connect(first)
    renewal = app.expect("issuance")
    found = lm.FoundReport(**world.request_fields(), phone=first.phone,
                           temporary_loss_id=temporary.request_id)
    effort.begin(app)
    await world.operator.submit(found, saga_id=temporary.request_id)
    await world.operator.submit(found)
    assert (await asyncio.wait_for(renewal, 180)).outcome == "issued"
    effort.end("found: renew the signing certificate", app)
    assert (await world.wait(timer)).status == "completed"
    renewed = certificates(first)[SIGN]
    ledger.expect(one[AUTH], GOOD)
    ledger.expect(one[SIGN], ("revoked", "superseded"))
    ledger.add("first/sign#2", renewed)
    await ledger.check("found")

    # 5. model change to a second phone; the first phone's applet goes when it is next online
    storage = app.core.storage
    await world.close_app(first)
    second, app2 = await issued(world, person, model="Galaxy S24")
    effort.whole("model change (new phone)", app2)
    two = certificates(second)
    ledger.add("second/auth", two[AUTH])
    ledger.add("second/sign", two[SIGN])
    ledger.expect(one[AUTH], ("revoked", "superseded"))
    ledger.expect(renewed, ("revoked", "superseded"))
    await ledger.check("model change")
    first.app.core.storage = storage
    effort.whole("old phone next online",
                 await stale_applet_removed_on_reconnect(world, first, person))
    await world.close_app(first)

    # 6. the second phone is lost
    await world.close_app(second)
    view = await world.report(lm.LossReport(**world.request_fields(), phone=second.phone))
    assert view.status == "completed", view
    ledger.expect(two[AUTH], ("revoked", "key_compromise"))
    ledger.expect(two[SIGN], ("revoked", "key_compromise"))
    await ledger.check("loss")

    # 7. issue on a third phone (nothing live: a new issuance)
    third, app3 = await issued(world, person, model="AQUOS sense8")
    three = certificates(third)
    ledger.add("third/auth", three[AUTH])
    ledger.add("third/sign", three[SIGN])
    await ledger.check("issue on a third phone")

    # 8. PIN reset (forgotten authentication PIN, blocked)
    for _ in range(3):
        verify_on_se(third, AUTH, "0000" if app3.user.pins[AUTH] != "0000" else "1111")
    assert third.pin_state(AUTH).state is jp.PinState.EXHAUSTED
    app3.user.next_pins[AUTH] = NEW_AUTH_PIN
    effort.begin(app3)
    assert (await asyncio.wait_for(app3.reset_pin([AUTH]), 180)).outcome == "issued"
    effort.end("PIN reset", app3)
    assert verify_on_se(third, AUTH, NEW_AUTH_PIN) == StatusWord.OK
    assert certificates(third) == three
    await ledger.check("PIN reset")

    # 9. disposal, confirmed with the signing password
    effort.begin(app3)
    done = await asyncio.wait_for(app3.dispose(), 180)
    effort.end("disposal", app3)
    assert (done.outcome, done.phase) == ("done", 1)
    ledger.expect(three[AUTH], ("revoked", "cessation_of_operation"))
    ledger.expect(three[SIGN], ("revoked", "cessation_of_operation"))
    await ledger.check("disposal")
    await applet_gone(world, third)

    # the lost phone turns up online later: cleaned too; then no keyed applet is left
    await stale_applet_removed_on_reconnect(world, second, person)
    assert all(phone.applet() is None for phone in (first, second, third))
    assert len(ledger.expected) == 7
    for stage, screens in effort.screens.items():
        print(f"{stage}: {' > '.join(screens)}")
    return effort.stages


async def audit(world: World, data_dir: Path) -> list[audit_mod.Violation]:
    phones = data_dir / "phones"
    phones.mkdir(exist_ok=True)
    for phone in world.phones:
        phone.se.save(phones / f"{phone.device_id}.se.json")
    return await audit_mod.audit_stores(orchestrator=world.orchestrator.db, ca=world.ca.database,
                                        tsm=world.tsm_db, phones=phones)


async def test_one_person_through_every_flow_embedded(tmp_path: Path) -> None:
    async with lifecycle_world(tmp_path) as world:
        effort = await walk(world)
        assert await audit(world, tmp_path) == []
    print("\n(screens seen, user actions) per flow:", effort)
    assert effort == UX


@pytest.mark.rabbitmq
@pytest.mark.mqtt
@pytest.mark.postgres
async def test_one_person_through_every_flow_on_real_services(
    tmp_path: Path, amqp_vhost_url: str, mqtt_url: str, pg_url: str, unique: str
) -> None:
    services = real_services(amqp_vhost_url, mqtt_url, pg_url, unique)
    capture = Capture(mqtt_url)
    await capture.start_mqtt()
    try:
        async with lifecycle_world(
            tmp_path, services,
            on_transport=lambda transport: capture.start_amqp(amqp_vhost_url, transport),
        ) as world:
            await walk(world)
            assert await audit(world, tmp_path) == []
            person = world.last_person
    finally:
        await capture.stop()
        await drop_schemas(services, tmp_path)
    # no PIN or password of the person, old or new, on either broker in any encoding
    secrets = {"card_password": person.card_password, "auth_pin": person.auth_pin,
               "signing_password": person.signing_password,
               "new_signing_password": NEW_SIGNING_PASSWORD, "new_auth_pin": NEW_AUTH_PIN}
    root = services.topic_root.split("/")[0]
    ours = [c for c in capture.items if c.where.startswith(("amqp:", f"mqtt:{root}/"))]
    assert sum(c.where.startswith("mqtt:") for c in ours) > 50
    leaks = scan(ours, secrets)
    assert leaks == [], [(h.secret_label, h.encoding, h.where) for h in leaks[:5]]
    # temporary PINs (issuances, the found phone's renewal, the PIN reset) travel only in
    # the TSM's scripts to the phone
    temporary: dict[str, str] = {}
    scripts = []
    for item in ours:
        try:
            message = decode(item.payload)
        except InvalidMessage:
            continue
        if message.envelope.type == "se.cmd.script":
            scripts.append(item)
            for pin in message.body.temporary_pins:
                temporary[f"{item.where}/{pin.kind.value}/{len(temporary)}"] = pin.pin
    assert len(temporary) >= 6, temporary.keys()
    leaks = scan([c for c in ours if c not in scripts], temporary)
    assert leaks == [], [(h.secret_label, h.encoding, h.where) for h in leaks[:5]]
