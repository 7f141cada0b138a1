"""One story per life-cycle flow (FLOWS.md §4), each ending with what the phone, the TSM
registry and the CA (OCSP) say. The same stories run on the embedded default
(``tests/orchestrator/flows/test_<flow>.py``) and on RabbitMQ + Mosquitto + PostgreSQL
(``tests/e2e/test_lifecycle_e2e.py``)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from device_sim.app import AppStorage, _exchange
from device_sim.fleet import Person
from device_sim.lifecycle_app import LifecycleApp, LifecycleScreen
from orchestrator import callcentre
from orchestrator import lifecycle_messages as lm
from orchestrator import messages as om
from protocol import jpki as jp
from protocol.envelope import build
from protocol.errors import StatusWord
from tests.e2e.lifecycle_world import SimPhone, World
from workers.tsm.registry import AppletState

AUTH, SIGN = om.CertificateKind.AUTH, om.CertificateKind.SIGN
GOOD = ("good", None)
HELD = ("revoked", "certificate_hold")


async def issued(world: World, person: Person, phone: SimPhone | None = None,
                 model: str = "Pixel 9") -> tuple[SimPhone, LifecycleApp]:
    """A phone of ``person`` that reached phase 4 with both certificates."""
    phone = phone or world.phone(model)
    app = await world.open_app(phone, person)
    await world.connect(phone)
    finished = await asyncio.wait_for(app.apply(), 180)
    assert (finished.outcome, finished.phase) == ("issued", 4), finished
    return phone, app


def certificates(phone: SimPhone) -> dict[om.CertificateKind, x509.Certificate]:
    out = {}
    for kind in (AUTH, SIGN):
        certificate = phone.certificate(kind)
        assert certificate is not None, f"no {kind} certificate on {phone.device_id}"
        out[kind] = certificate
    return out


async def statuses(world: World, certs: dict[om.CertificateKind, x509.Certificate]) -> dict:
    return {kind: await world.ocsp(c) for kind, c in certs.items()}


def verify_on_se(phone: SimPhone, kind: om.CertificateKind, pin: str) -> int:
    """VERIFY ``pin`` on the phone's SE as any host would; the status word."""
    ef = jp.EF.AUTH_PIN if kind is AUTH else jp.EF.SIGN_PIN
    _exchange(phone.se, jp.select_ap())
    _exchange(phone.se, jp.select_ef(ef))
    sw = _exchange(phone.se, jp.verify(pin.encode())).sw
    _exchange(phone.se, jp.select_ap())
    return sw


async def applet_gone(world: World, phone: SimPhone) -> None:
    assert phone.applet() is None, "the applet is still on the SE"
    record = await world.registry(phone)
    assert (record.applet_state, record.holds_keys) == (AppletState.ABSENT, False), record


async def stale_applet_removed_on_reconnect(world: World, phone: SimPhone,
                                            person: Person) -> LifecycleApp:
    """The phone comes back (same app storage): the online saga deletes the keyed applet
    and the app goes back to phase 1."""
    assert phone.applet() is not None and phone.applet().holds_keys()
    storage = phone.app.core.storage if phone.app else None
    app = await world.open_app(phone, person, storage=storage)
    finished = app.expect("online")
    saga_id = await world.connect(phone)
    view = await world.wait(saga_id)
    assert (view.status, view.data.deleted) == ("completed", True), view
    ended = await asyncio.wait_for(finished, 60)
    assert (ended.outcome, ended.phase) == ("done", 1)
    assert app.core.storage.phase == 1 and app.core.storage.certificates == []
    await applet_gone(world, phone)
    return app


# ---------------------------------------------------------------------------------------
# From the app


async def story_pin_change(world: World) -> None:
    alice = await world.person()
    phone, app = await issued(world, alice)
    before = certificates(phone)
    old = app.user.pins[AUTH]
    app.user.next_pins[AUTH] = "9876" if old != "9876" else "6789"
    finished = await app.change_pin(AUTH)
    assert finished.outcome == "done"
    new = app.user.pins[AUTH]
    assert new != old
    # the phone: the old PIN is refused (a try spent), the new one verifies
    assert verify_on_se(phone, AUTH, old) == 0x63C2
    assert verify_on_se(phone, AUTH, new) == StatusWord.OK
    assert phone.pin_state(AUTH).state is jp.PinState.SET
    assert phone.pin_state(AUTH).tries_left == 3
    # the back end recorded which PIN changed, and nothing else moved
    saga_id = phone.new_ids[-1]
    view = await world.wait(saga_id)
    assert (view.flow, view.status, view.data.kind) == ("lifecycle.pin_change", "completed", AUTH)
    assert certificates(phone) == before
    assert await statuses(world, before) == {AUTH: GOOD, SIGN: GOOD}
    record = await world.registry(phone)
    assert (record.holds_keys, record.applet_state) == (True, AppletState.RELEASED)


async def story_pin_reset(world: World) -> None:
    alice, mallory = await world.person(), await world.person()
    phone, app = await issued(world, alice)
    before = certificates(phone)
    # the user forgot the PIN and blocked it
    for _ in range(3):
        verify_on_se(phone, AUTH, "0000" if app.user.pins[AUTH] != "0000" else "1111")
    assert phone.pin_state(AUTH).state is jp.PinState.EXHAUSTED
    # someone else's card cannot reset it
    thief = await world.open_app(phone, mallory, storage=app.core.storage)
    refused = await asyncio.wait_for(thief.reset_pin([AUTH]), 180)
    assert (refused.outcome, refused.reason) == ("refused", "bad_application")
    assert phone.pin_state(AUTH).state is jp.PinState.EXHAUSTED
    # the owner's card can
    app = await world.open_app(phone, alice, storage=thief.core.storage, user=app.user)
    app.user.next_pins[AUTH] = "4242"
    finished = await asyncio.wait_for(app.reset_pin([AUTH]), 180)
    assert (finished.outcome, finished.phase) == ("issued", 4), finished
    assert phone.pin_state(AUTH).state is jp.PinState.SET
    assert phone.pin_state(AUTH).tries_left == 3
    assert verify_on_se(phone, AUTH, "4242") == StatusWord.OK
    # the certificates and keys stayed
    assert certificates(phone) == before
    assert await statuses(world, before) == {AUTH: GOOD, SIGN: GOOD}
    assert (await world.registry(phone)).holds_keys


async def forged_disposal_is_refused(world: World, phone: SimPhone) -> None:
    """A disposal confirmed by a key that is not the phone's live one changes nothing."""
    assert phone.link is not None
    saga_id = uuid.uuid4().hex
    request = lm.DisposalRequest(device_id=phone.device_id,
                                 app_instance_id=phone.app.core.storage.app_instance_id,
                                 se=phone.se_identity)
    await phone.link.send(build(request, saga_id=saga_id, device_id=phone.device_id))
    await world.wait(saga_id, status="event")
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signature = stranger.sign(b"anything", padding.PKCS1v15(), hashes.SHA256())
    sign_certificate = phone.applet().files[jp.EF.SIGN_CERT]
    forged = lm.DisposalConfirmed(kind=SIGN, signature=signature, certificate=sign_certificate)
    await phone.link.send(build(forged, saga_id=saga_id, device_id=phone.device_id))
    view = await world.wait(saga_id)
    assert (view.status, view.data.refusal) == ("compensated", "bad_confirmation"), view


async def story_disposal(world: World) -> None:
    alice = await world.person()
    phone, app = await issued(world, alice)
    before = certificates(phone)
    await forged_disposal_is_refused(world, phone)
    assert await statuses(world, before) == {AUTH: GOOD, SIGN: GOOD}
    assert phone.applet() is not None
    # the user slips once on the signing password: a try is spent and it is asked again
    app.user.script = dataclasses.replace(
        app.user.script, typos=frozenset({LifecycleScreen.DISPOSE_PASSWORD}))
    finished = await asyncio.wait_for(app.dispose(), 180)
    assert (finished.what, finished.outcome, finished.phase) == ("disposal", "done", 1), finished
    assert await statuses(world, before) == {
        AUTH: ("revoked", "cessation_of_operation"), SIGN: ("revoked", "cessation_of_operation")}
    await applet_gone(world, phone)
    assert app.core.storage.phase == 1
    notices = [sc.notice for sc in app.core.screens_shown
               if sc.id == LifecycleScreen.DISPOSE_PASSWORD]
    assert notices == ["", "Wrong: 4 tries left."]


async def story_reissue(world: World) -> None:
    """Reissue (expiry, card renewal): a new application on the same phone; new keys and
    certificates, the old ones revoked (superseded)."""
    alice = await world.person()
    phone, app = await issued(world, alice)
    old = certificates(phone)
    old_key = phone.applet().public_key(jp.EF.AUTH_KEY).public_numbers()
    finished = await asyncio.wait_for(app.apply(), 180)
    assert (finished.outcome, finished.phase) == ("issued", 4)
    new = certificates(phone)
    assert {c.serial_number for c in new.values()}.isdisjoint(c.serial_number for c in old.values())
    assert phone.applet().public_key(jp.EF.AUTH_KEY).public_numbers() != old_key
    assert await statuses(world, old) == {AUTH: ("revoked", "superseded"),
                                          SIGN: ("revoked", "superseded")}
    assert await statuses(world, new) == {AUTH: GOOD, SIGN: GOOD}


async def story_model_change(world: World) -> None:
    """Issue on the new phone (issuance's model-change branch), the old phone's revoked;
    the old applet is deleted when that phone is next online."""
    alice = await world.person()
    old_phone, old_app = await issued(world, alice)
    old = certificates(old_phone)
    storage = AppStorage.from_state(old_app.core.storage.to_state())
    await world.close_app(old_phone)  # put away
    new_phone, new_app = await issued(world, alice, model="Galaxy S24")
    assert new_app.core.screens_shown[-1].text.endswith("previous phone were revoked.")
    assert await statuses(world, old) == {AUTH: ("revoked", "superseded"),
                                          SIGN: ("revoked", "superseded")}
    assert await statuses(world, certificates(new_phone)) == {AUTH: GOOD, SIGN: GOOD}
    old_phone.app.core.storage = storage
    await stale_applet_removed_on_reconnect(world, old_phone, alice)
    assert (await world.registry(new_phone)).holds_keys


# ---------------------------------------------------------------------------------------
# From the call centre


async def story_loss(world: World) -> None:
    alice = await world.person()
    phone, app = await issued(world, alice)
    before = certificates(phone)
    await world.close_app(phone)  # the phone is gone
    # an unauthenticated report changes nothing
    forged = callcentre.sign(lm.LossReport(**world.request_fields(), phone=phone.phone),
                             b"not the operator's key!")
    view = await world.report_as_is(forged)
    assert view.status == "compensated" and "NotAuthenticated" in view.reason, view
    assert await statuses(world, before) == {AUTH: GOOD, SIGN: GOOD}
    # the operator's report revokes both
    view = await world.report(lm.LossReport(**world.request_fields(), phone=phone.phone))
    assert (view.flow, view.status) == ("lifecycle.loss", "completed"), view
    assert sorted(view.data.revoked) == sorted(f"{c.serial_number:040X}" for c in before.values())
    assert await statuses(world, before) == {AUTH: ("revoked", "key_compromise"),
                                             SIGN: ("revoked", "key_compromise")}
    assert (await world.registry(phone)).holds_keys  # unreachable: the applet waits
    await stale_applet_removed_on_reconnect(world, phone, alice)


async def story_failure(world: World) -> None:
    alice = await world.person()
    phone, app = await issued(world, alice)
    before = certificates(phone)
    await world.close_app(phone)  # broken
    view = await world.report(lm.FailureReport(**world.request_fields(), phone=phone.phone))
    assert (view.flow, view.status) == ("lifecycle.failure", "completed"), view
    assert await statuses(world, before) == {AUTH: ("revoked", "cessation_of_operation"),
                                             SIGN: ("revoked", "cessation_of_operation")}
    # repaired: the stale applet goes at its first connection
    await stale_applet_removed_on_reconnect(world, phone, alice)


async def story_temporary_loss_found(world: World) -> None:
    alice = await world.person()
    phone, app = await issued(world, alice)
    before = certificates(phone)
    await world.close_app(phone)
    report = lm.TemporaryLossReport(**world.request_fields(), phone=phone.phone)
    timer = await world.report(report, wait=False)
    await world.wait(timer, status="event")  # held, the not-found timer running
    assert await statuses(world, before) == {AUTH: HELD, SIGN: HELD}
    # found: the phone is back with its user; a held phone keeps its applet
    app = await world.open_app(phone, alice, storage=app.core.storage, user=app.user)
    await world.connect(phone)
    assert phone.applet() is not None and (await world.registry(phone)).holds_keys
    renewal = app.expect("issuance")
    found = lm.FoundReport(**world.request_fields(), phone=phone.phone,
                           temporary_loss_id=report.request_id)
    await world.operator.submit(found, saga_id=report.request_id)  # stops the timer
    saga_id = await world.operator.submit(found)
    finished = await asyncio.wait_for(renewal, 180)
    assert (finished.outcome, finished.phase) == ("issued", 4), finished
    view = await world.wait(saga_id)
    assert (view.flow, view.status) == ("lifecycle.found", "completed"), view
    assert (await world.wait(timer)).status == "completed"
    after = certificates(phone)
    assert after[AUTH] == before[AUTH]  # released, same certificate and key
    assert after[SIGN].serial_number != before[SIGN].serial_number
    assert await statuses(world, before) == {AUTH: GOOD, SIGN: ("revoked", "superseded")}
    assert await statuses(world, after) == {AUTH: GOOD, SIGN: GOOD}
    assert phone.pin_state(SIGN).state is jp.PinState.SET
    assert verify_on_se(phone, SIGN, app.user.pins[SIGN]) == StatusWord.OK


async def story_temporary_loss_not_found(world: World) -> None:
    """Needs a world whose not-found period is short (the timer is a saga_timers row)."""
    alice = await world.person()
    phone, app = await issued(world, alice)
    before = certificates(phone)
    await world.close_app(phone)
    report = lm.TemporaryLossReport(**world.request_fields(), phone=phone.phone)
    saga_id = await world.report(report, wait=False)
    await world.wait(saga_id, status="event")
    seen = await statuses(world, before)
    if (await world.orchestrator.engine.get(saga_id)).waiting == "event":
        assert seen == {AUTH: HELD, SIGN: HELD}  # seen while the timer still ran
    else:  # a loaded machine let the short period pass before the OCSP check
        assert set(seen.values()) <= {HELD, ("revoked", "key_compromise")}, seen
    view = await world.wait(saga_id, within=120)
    assert view.status == "compensated" and "s03_until_found" in view.reason, view
    assert await statuses(world, before) == {AUTH: ("revoked", "key_compromise"),
                                             SIGN: ("revoked", "key_compromise")}
    await stale_applet_removed_on_reconnect(world, phone, alice)


def card_signing_serial(person: Person) -> str:
    """The serial of the signing certificate on the person's card (EF 0001)."""
    der = person.card.applet.files[jp.EF.SIGN_CERT]
    return f"{x509.load_der_x509_certificate(der).serial_number:040X}"


async def story_card_cascade(world: World) -> None:
    alice, bob = await world.person(), await world.person()
    phone_a, _ = await issued(world, alice)
    phone_b, _ = await issued(world, bob)
    certs_a, certs_b = certificates(phone_a), certificates(phone_b)
    # Alice moved: her card's signing certificate is revoked → her phone signing certificate
    card_a = card_signing_serial(alice)
    view = await world.report(lm.CardCascadeReport(**world.request_fields(), card_serial=card_a))
    assert (view.flow, view.status) == ("lifecycle.card_cascade", "completed"), view
    assert await statuses(world, certs_a) == {AUTH: GOOD, SIGN: ("revoked", "affiliation_changed")}
    # her phone keeps its applet: the authentication certificate is live
    await world.connect(phone_a)
    assert phone_a.applet() is not None
    # Bob renewed his card → both phone certificates
    card_b = card_signing_serial(bob)
    view = await world.report(lm.CardCascadeReport(**world.request_fields(), card_serial=card_b,
                                                   renewed=True))
    assert view.status == "completed", view
    assert await statuses(world, certs_b) == {AUTH: ("revoked", "superseded"),
                                              SIGN: ("revoked", "superseded")}
    await stale_applet_removed_on_reconnect(world, phone_b, bob)


Story = Callable[[World], Awaitable[None]]
STORIES: dict[str, Story] = {
    "pin_change": story_pin_change,
    "pin_reset": story_pin_reset,
    "disposal": story_disposal,
    "reissue": story_reissue,
    "model_change": story_model_change,
    "loss": story_loss,
    "failure": story_failure,
    "temporary_loss_found": story_temporary_loss_found,
    "temporary_loss_not_found": story_temporary_loss_not_found,
    "card_cascade": story_card_cascade,
}
