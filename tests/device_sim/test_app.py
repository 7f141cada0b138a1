"""The UI app against a real personalised My Number Card: screens of phases 1 and 3, the
card signature over "NFC", the virtual user's typo path, and what never leaves the phone."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from device_sim.app import (
    AppCore,
    DeviceInfo,
    PhoneApp,
    ScreenId,
    Secret,
    SecretKind,
    UserScript,
    VirtualUser,
)
from device_sim.card import SAMPLE_HOLDER, TestCardCa, manufacture_card
from orchestrator import messages as om
from protocol import jpki
from protocol.envelope import Message, build, decode, encode
from tests.e2e.secrets_scan import Captured, scan

CARD_PASSWORD = "CARDPASS42"
PHONE_AUTH_PIN = "5931"
PHONE_SIGNING_PASSWORD = "PHONE2SIGN"
SE = om.SeIdentity(cin="0102030405060708090A", kdd="0102030405060708090A")


@pytest.fixture(scope="module")
def card_ca() -> TestCardCa:
    return TestCardCa()


@pytest.fixture
def card(card_ca):
    return manufacture_card(SAMPLE_HOLDER, card_ca, auth_pin="2468", sign_password=CARD_PASSWORD)


class RecordingLink:
    """The phone's up link, recorded: every message goes through the real wire encoding."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send(self, message: Message) -> None:
        self.sent.append(encode(message))

    def messages(self) -> list[Message]:
        return [decode(raw) for raw in self.sent]


def _phone(card, typos=frozenset(), certificates="both", model="Pixel 9"):
    device = DeviceInfo("phone-0001", model, "Android", "15", se_present=True)
    core = AppCore(device, se=None, se_identity=SE)
    script = UserScript(
        card_password=CARD_PASSWORD,
        auth_pin=PHONE_AUTH_PIN,
        signing_password=PHONE_SIGNING_PASSWORD,
        certificates=certificates,
        typos=frozenset(typos),
    )
    link = RecordingLink()
    return PhoneApp(core, VirtualUser(script, card), link), link


def _request(core: AppCore, enrolment: om.Enrolment, **overrides) -> Message:
    application = om.Application(
        application_id=enrolment.application_id,
        nonce=b"n" * 32,
        device_id=overrides.get("device_id", enrolment.device_id),
        app_instance_id=enrolment.app_instance_id,
        se=enrolment.se,
        certificates=enrolment.certificates,
        requested_at=datetime(2026, 6, 1, tzinfo=UTC),
    )
    return build(
        om.CardSignatureRequest(application=application),
        saga_id=enrolment.application_id,
        device_id=enrolment.device_id,
    )


async def _enrol(app: PhoneApp, link: RecordingLink) -> om.Enrolment:
    async with app._lock:
        await app._carry_out(app.core.start_issuance())
    enrolment = link.messages()[-1].body
    assert isinstance(enrolment, om.Enrolment)
    return enrolment


async def test_phase_1_reports_the_phone_and_the_choice(card):
    app, link = _phone(card, certificates="auth")
    enrolment = await _enrol(app, link)
    assert enrolment.device_id == "phone-0001"
    assert enrolment.model == "Pixel 9" and enrolment.os_version == "15"
    assert enrolment.se_present and enrolment.se == SE
    assert enrolment.certificates == [om.CertificateKind.AUTH]
    assert enrolment.pin_option is om.PinOption.INITIAL_STATE
    assert enrolment.app_instance_id == app.core.storage.app_instance_id
    assert link.messages()[-1].envelope.saga_id == enrolment.application_id
    shown = [s.id for s in app.core.screens_shown]
    assert shown == [ScreenId.WELCOME, ScreenId.PREPARING]
    assert app.user.actions == 1  # one choice


async def test_card_signs_the_application_after_the_card_password(card):
    app, link = _phone(card)
    enrolment = await _enrol(app, link)
    request = _request(app.core, enrolment)
    await app.deliver(request)
    answer = link.messages()[-1]
    assert isinstance(answer.body, om.CardSignature)
    assert answer.envelope.saga_id == enrolment.application_id
    assert answer.envelope.causation_id == request.envelope.message_id
    card_certificate = x509.load_der_x509_certificate(answer.body.card_certificate)
    to_be_signed = request.body.application.to_be_signed()
    card_certificate.public_key().verify(
        answer.body.signature, to_be_signed, padding.PKCS1v15(), hashes.SHA256()
    )
    shown = [s.id for s in app.core.screens_shown]
    assert shown[-3:] == [ScreenId.CARD_PASSWORD, ScreenId.TAP_CARD, ScreenId.ISSUING]
    # choice + password + tap
    assert app.user.actions == 3


async def test_mistyped_card_password_costs_one_try_and_one_more_screen(card):
    app, link = _phone(card, typos={ScreenId.CARD_PASSWORD})
    enrolment = await _enrol(app, link)
    await app.deliver(_request(app.core, enrolment))
    password_screens = [s for s in app.core.screens_shown if s.id is ScreenId.CARD_PASSWORD]
    assert len(password_screens) == 2
    assert "4 tries left" in password_screens[1].notice
    assert isinstance(link.messages()[-1].body, om.CardSignature)
    # The second, right password reset the card's counter (ISO 7816-4 VERIFY semantics).
    card.transmit(jpki.select_ap().to_bytes())
    card.transmit(jpki.select_ef(jpki.EF.SIGN_PIN).to_bytes())
    assert card.transmit(jpki.retries_left().to_bytes())[-2:] == b"\x63\xc5"
    assert app.user.actions == 5  # choice, wrong password, tap, password, tap


async def test_blocked_card_password_aborts_with_a_reason(card):
    for _ in range(5):  # someone else used up the card's tries
        card.transmit(jpki.select_ap().to_bytes())
        card.transmit(jpki.select_ef(jpki.EF.SIGN_PIN).to_bytes())
        card.transmit(jpki.verify(b"WRONG1").to_bytes())
    app, link = _phone(card)
    enrolment = await _enrol(app, link)
    issuance = app._future("issuance")
    await app.deliver(_request(app.core, enrolment))
    aborted = link.messages()[-1].body
    assert isinstance(aborted, om.Aborted)
    assert aborted.reason is om.Reason.CARD_PASSWORD_BLOCKED
    finished = await issuance
    assert finished.outcome == om.Outcome.CANCELLED.value
    assert app.core.screens_shown[-1].id is ScreenId.FAILED


async def test_application_for_another_phone_is_not_signed(card):
    app, link = _phone(card)
    enrolment = await _enrol(app, link)
    await app.deliver(_request(app.core, enrolment, device_id="someone-else"))
    aborted = link.messages()[-1].body
    assert isinstance(aborted, om.Aborted) and aborted.reason is om.Reason.BAD_APPLICATION
    assert ScreenId.CARD_PASSWORD not in [s.id for s in app.core.screens_shown]


async def test_unsupported_phone_ends_on_the_refusal_screen(card):
    app, link = _phone(card, model="Feature Phone 1")
    enrolment = await _enrol(app, link)
    issuance = app._future("issuance")
    await app.deliver(
        build(
            om.Result(outcome=om.Outcome.REFUSED, phase=1, reason=om.Reason.UNSUPPORTED_MODEL),
            saga_id=enrolment.application_id,
        )
    )
    finished = await issuance
    assert (finished.outcome, finished.reason) == ("refused", "unsupported_model")
    last = app.core.screens_shown[-1]
    assert last.id is ScreenId.REFUSED and "does not support" in last.text


async def test_card_password_is_in_no_message_and_was_held_briefly(card):
    app, link = _phone(card, typos={ScreenId.CARD_PASSWORD})
    enrolment = await _enrol(app, link)
    await app.deliver(_request(app.core, enrolment))
    sent = [Captured("phone", payload) for payload in link.sent]
    # the right one and the slip
    assert scan(sent, {"card password": CARD_PASSWORD, "slip": "CARDPASS41"}) == []
    holds = [h for h in app.core.secret_holds if h.kind == SecretKind.CARD_SIGNING_PASSWORD]
    assert len(holds) == 2 and all(0 <= h.held_s < 5 for h in holds)


def test_secret_is_redacted_and_wiped():
    secret = Secret("1234", SecretKind.AUTH_PIN, created_at=0.0)
    assert "1234" not in repr(secret) and "1234" not in str(secret)
    assert secret.reveal() == b"1234"
    secret.wipe()
    assert secret.wiped
    with pytest.raises(Exception, match="wiped"):
        secret.reveal()


def test_user_script_does_not_show_its_secrets():
    script = UserScript(card_password=CARD_PASSWORD, auth_pin="1234", signing_password="ABC123")
    assert CARD_PASSWORD not in repr(script) and "1234" not in repr(script)
