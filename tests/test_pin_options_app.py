"""The app's side of options 1 and 6: the code handed to the user, typed back, checked for
format before anything reaches the SE, and never in a repr."""

from __future__ import annotations

import pytest

from device_sim.app import AppCore, DeviceInfo, ScreenId, Show, Step
from orchestrator import messages as om
from protocol.envelope import build

AUTH = om.CertificateKind.AUTH


class SeNotToBeTouched:
    def transmit(self, command: bytes) -> bytes:
        raise AssertionError("the SE must not see a malformed code")

    def run_script(self, script):
        raise AssertionError("no script in this test")


def _screens(actions) -> list:
    return [a.screen for a in actions if isinstance(a, Show)]


@pytest.mark.parametrize(
    ("option", "code", "malformed"),
    [(om.PinOption.USER_TYPES_TEMPORARY, b"4821", ["", "12", "12345", "ABCD"]),
     (om.PinOption.PUK, b"90817263", ["", "1234567", "123456789", "1234567A"])],
)
def test_code_is_shown_once_then_typed_and_checked_for_format(option, code, malformed):
    core = AppCore(DeviceInfo("phone-1", "Pixel 9", "Android", "15", True), SeNotToBeTouched(),
                   om.SeIdentity(cin="A1A2", kdd="A1A2"))
    core.start_issuance()
    core.answer(ScreenId.WELCOME, {"certificates": "auth", "pin_option": option})
    saga = core.issuance.application_id
    core.issuance.step = Step.WAITING_RELEASE  # the card signature is not this test's subject
    pins = {AUTH: b"4821" if option is om.PinOption.PUK else code}
    puks = {AUTH: code} if option is om.PinOption.PUK else None
    core.temporary_pins_received(saga, pins, puks)
    (delivered,) = _screens(core.receive(build(
        om.PinSettingGoAhead(certificates=[AUTH], pin_option=option), saga_id=saga)))
    assert delivered.id is ScreenId.DELIVERED_CODE
    assert delivered.shown.reveal() == code
    assert code.decode() not in repr(delivered)
    (set_pin,) = _screens(core.answer(ScreenId.DELIVERED_CODE, {"ok": True}))
    assert set_pin.id is ScreenId.SET_AUTH_PIN
    assert delivered.shown.wiped  # the app keeps no copy once the user has it
    (enter,) = _screens(core.answer(ScreenId.SET_AUTH_PIN, {"pin": "5931", "confirm": "5931"}))
    assert enter.id is ScreenId.ENTER_CODE and not enter.notice
    for typed in malformed:
        (again,) = _screens(core.answer(ScreenId.ENTER_CODE, {"code": typed}))
        assert again.id is ScreenId.ENTER_CODE
        assert "characters" in again.notice
    core.receive(build(om.Result(outcome=om.Outcome.FAILED, phase=1, reason=om.Reason.TIMEOUT),
                       saga_id=saga))
    assert not core.issuance.new_pins and not core.issuance.puks
    assert not core.issuance.temporary_pins
