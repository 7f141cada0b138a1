"""The JPKI applet inside a phone's secure element: personalisation only through SCP03.

The applet is installed in the GlobalPlatform card manager and driven by the SP-TSM's own
script sessions (real SCP03, security level 33, one round trip with the pseudo-random
card challenge). The same personalisation commands sent in clear, or inside a session
that someone tampered with, change nothing.
"""

from __future__ import annotations

import pytest

from device_sim.se.element import SecureElement
from device_sim.se.jpki_applet import (
    GeneratedKeys,
    JpkiApplet,
    JpkiAppletFactory,
    Profile,
    public_key_der,
)
from protocol import jpki
from protocol.apdu import CommandAPDU, ResponseAPDU
from protocol.errors import JpkiError
from protocol.jpki import EF, PinState, TemporaryPinMode
from workers.tsm import scripts
from workers.tsm.keys import MasterKeyRing, MasterKeys
from workers.tsm.provisioning import manufacture_secure_element

CIN = bytes.fromhex("0102030405060708090A")


class _OneKey:
    def __init__(self) -> None:
        self.key = GeneratedKeys().new_key()

    def new_key(self):
        return self.key


@pytest.fixture(scope="module")
def key_source() -> _OneKey:
    return _OneKey()


@pytest.fixture
def ring() -> MasterKeyRing:
    return MasterKeyRing({0x30: MasterKeys.generate(0x30)}, 0x30)


@pytest.fixture
def element(ring: MasterKeyRing, key_source: _OneKey) -> SecureElement:
    element = manufacture_secure_element(ring, CIN, JpkiAppletFactory(Profile.PHONE, key_source))
    run(element, ring, scripts.plan_install())
    return element


def access(ring: MasterKeyRing) -> scripts.SeAccess:
    return scripts.SeAccess(ring.current_keys.static_keys_for(CIN), 0x30, CIN)


def run(element: SecureElement, ring: MasterKeyRing, plan: scripts.OperationPlan,
        tamper: int | None = None) -> list[ResponseAPDU]:
    """The SP-TSM's one-round-trip script: SELECT, IU, EA and the plan's commands."""
    session = scripts.ScriptSession(plan, access(ring))
    counter = element.manager.domains[scripts.SP_SD_AID].sequence_counter + 1
    wire = session.offline_script(counter)
    responses = []
    for n, step in enumerate(wire):
        apdu = bytearray(step.apdu)
        if n == tamper:
            apdu[-1] ^= 0x01
        responses.append(element.transmit(bytes(apdu)))
    return session.verify_offline(responses)


def applet(element: SecureElement) -> JpkiApplet:
    installed = element.manager.applications[jpki.AID].applet
    assert isinstance(installed, JpkiApplet)
    return installed


def clear(element: SecureElement, command: CommandAPDU) -> int:
    return ResponseAPDU.from_bytes(element.transmit(command.to_bytes())).sw


def test_personalisation_inside_the_tsm_session(element: SecureElement, ring: MasterKeyRing,
                                                key_source: _OneKey) -> None:
    challenge = bytes(range(16))
    answers = run(element, ring, scripts.plan_generate_keys(
        [scripts.CertificateKind.AUTH], "owner-1", [challenge]))
    verified = scripts.interpret_generated_key(scripts.CertificateKind.AUTH, challenge, answers[1])
    assert verified.public_key_der == public_key_der(key_source.key)
    assert applet(element).owner_reference() == "owner-1"
    run(element, ring, scripts.OperationPlan("pin", jpki.AID, (
        scripts.Step("SET TEMPORARY PIN", jpki.set_temporary_pin(
            EF.AUTH_PIN, b"9876", TemporaryPinMode.INITIAL)),
    )))
    assert applet(element).pin_status(EF.AUTH_PIN).state is PinState.INITIAL
    answers = run(element, ring, scripts.plan_release([scripts.CertificateKind.AUTH],
                                                      TemporaryPinMode.INITIAL))
    assert scripts.interpret_pin_status(answers[-1]).state is PinState.INITIAL_RELEASED


def test_same_commands_in_clear_are_refused(element: SecureElement, ring: MasterKeyRing) -> None:
    assert clear(element, jpki.select_ap()) == 0x9000
    for command in (
        jpki.generate_key_pair(EF.AUTH_KEY, bytes(16)),
        jpki.set_temporary_pin(EF.AUTH_PIN, b"1111", TemporaryPinMode.USABLE),
        jpki.set_owner_reference("thief"),
        jpki.wipe_keys(),
    ):
        assert clear(element, command) == 0x6982
    assert not applet(element).holds_keys()
    assert applet(element).owner_reference() is None
    assert applet(element).pin_status(EF.AUTH_PIN).state is PinState.NOT_SET
    # The public interface works in clear, as OpenSC and the app use it.
    assert clear(element, jpki.select_ef(EF.TOKEN)) == 0x9000
    response = ResponseAPDU.from_bytes(element.transmit(jpki.read_binary(0, 32).to_bytes()))
    assert jpki.parse_token(response.data) == "JPKIAPGPSETOKEN"


def test_a_tampered_personalisation_command_changes_nothing(
    element: SecureElement, ring: MasterKeyRing
) -> None:
    plan = scripts.plan_generate_keys([scripts.CertificateKind.SIGN], "owner-2", [bytes(16)])
    with pytest.raises(JpkiError):
        run(element, ring, plan, tamper=3)  # SET OWNER REFERENCE, wrapped, one bit flipped
    assert not applet(element).holds_keys() and applet(element).owner_reference() is None
