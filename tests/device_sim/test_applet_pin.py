"""PIN states of the six PIN-setting options of the seed, through the applet's APDUs.

In each option the SP-TSM's commands arrive inside SCP03 (``SECURE``) and the app's or an
attacker's over the plain interface. "Attack" = someone who learnt the temporary PIN tries
to make a signature while the temporary PIN is set.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from device_sim.se.applet_api import CommandContext
from device_sim.se.jpki_applet import GeneratedKeys, JpkiApplet, Profile
from device_sim.se.pin import Phase, Pin
from protocol import jpki
from protocol.apdu import CommandAPDU
from protocol.jpki import EF, PinState, TemporaryPinMode

SECURE = CommandContext(secure=True, security_level=0x33)
PLAIN = CommandContext(secure=False)
TEMP = b"TEMP42"
REAL = b"MYSIGN2024"
PUK = b"24681357"


@pytest.fixture(scope="module")
def key():
    return GeneratedKeys().new_key()


class _Key:
    def __init__(self, key) -> None:
        self.key = key

    def new_key(self):
        return self.key


@pytest.fixture
def applet(key) -> JpkiApplet:
    applet = JpkiApplet(Profile.PHONE, _Key(key))
    tsm(applet, jpki.generate_key_pair(EF.SIGN_KEY, bytes(16)))
    applet.on_select()
    return applet


def tsm(applet: JpkiApplet, command: CommandAPDU) -> int:
    return applet.process(command, SECURE).sw


def user(applet: JpkiApplet, command: CommandAPDU) -> int:
    return applet.process(command, PLAIN).sw


def state(applet: JpkiApplet) -> PinState:
    return applet.pin_status(EF.SIGN_PIN).state


def attack(applet: JpkiApplet) -> bool:
    """VERIFY with the temporary PIN, then try to sign. True if a signature came out."""
    applet.on_select()
    user(applet, jpki.select_ef(EF.SIGN_PIN))
    user(applet, jpki.verify(TEMP))
    user(applet, jpki.select_ef(EF.SIGN_KEY))
    response = applet.process(
        jpki.compute_digital_signature(
            jpki.digest_info("sha256", hashlib.sha256(b"forged contract").digest())
        ),
        PLAIN,
    )
    applet.on_select()
    return response.sw == 0x9000 and len(response.data) == 256


def local_pin_setting(applet: JpkiApplet) -> tuple[int, int]:
    """FLOWS step 12: the app VERIFYs the temporary PIN and CHANGEs it to the user's."""
    applet.on_select()
    user(applet, jpki.select_ef(EF.SIGN_PIN))
    verify_sw = user(applet, jpki.verify(TEMP))
    change_sw = user(applet, jpki.change_reference_data(REAL))
    return verify_sw, change_sw


def can_sign_with_real_pin(applet: JpkiApplet) -> bool:
    applet.on_select()
    user(applet, jpki.select_ef(EF.SIGN_PIN))
    if user(applet, jpki.verify(REAL)) != 0x9000:
        return False
    user(applet, jpki.select_ef(EF.SIGN_KEY))
    digest = jpki.digest_info("sha256", bytes(32))
    return user(applet, jpki.compute_digital_signature(digest)) == 0x9000


@pytest.mark.parametrize("option", [1, 2, 5])
def test_options_1_2_5_temporary_pin_is_usable(applet: JpkiApplet, option: int) -> None:
    # Options 1, 2 and 5 differ in who types the temporary PIN and when the real PIN is
    # known, not in the applet: the temporary PIN works, so the attack succeeds.
    assert tsm(applet, jpki.set_temporary_pin(EF.SIGN_PIN, TEMP, TemporaryPinMode.USABLE)) \
        == 0x9000
    assert state(applet) is PinState.TEMPORARY
    assert attack(applet) is True
    assert local_pin_setting(applet) == (0x9000, 0x9000)
    assert state(applet) is PinState.SET
    assert attack(applet) is False  # the temporary PIN is gone
    assert can_sign_with_real_pin(applet)


def test_option_1_mistyped_temporary_pin_costs_a_try(applet: JpkiApplet) -> None:
    tsm(applet, jpki.set_temporary_pin(EF.SIGN_PIN, TEMP, TemporaryPinMode.USABLE))
    user(applet, jpki.select_ef(EF.SIGN_PIN))
    assert user(applet, jpki.verify(b"TEMP24")) == 0x63C4
    assert applet.pin_status(EF.SIGN_PIN).tries_left == 4


def test_option_3_blocked_until_the_tsm_lifts_it(applet: JpkiApplet) -> None:
    assert tsm(applet, jpki.set_temporary_pin(EF.SIGN_PIN, TEMP, TemporaryPinMode.BLOCKED)) \
        == 0x9000
    assert state(applet) is PinState.TEMPORARY_BLOCKED
    assert attack(applet) is False
    user(applet, jpki.select_ef(EF.SIGN_PIN))
    assert user(applet, jpki.verify(TEMP)) == 0x6984
    assert user(applet, jpki.retries_left()) == 0x6984
    assert applet.pin_status(EF.SIGN_PIN).tries_left == 5  # refusals spend no try
    assert tsm(applet, jpki.transition_pin(EF.SIGN_PIN)) == 0x6985  # wrong release for option 3
    assert tsm(applet, jpki.unblock_pin(EF.SIGN_PIN)) == 0x9000  # FLOWS step 11
    assert state(applet) is PinState.TEMPORARY
    assert tsm(applet, jpki.unblock_pin(EF.SIGN_PIN)) == 0x6985  # not blocked any more
    assert local_pin_setting(applet) == (0x9000, 0x9000)
    assert state(applet) is PinState.SET
    assert can_sign_with_real_pin(applet)


def test_option_4_initial_state_then_only_settable(applet: JpkiApplet) -> None:
    assert tsm(applet, jpki.set_temporary_pin(EF.SIGN_PIN, TEMP, TemporaryPinMode.INITIAL)) \
        == 0x9000
    assert state(applet) is PinState.INITIAL
    assert attack(applet) is False
    assert local_pin_setting(applet) == (0x6984, 0x6982)  # nothing verifies in INITIAL
    assert tsm(applet, jpki.unblock_pin(EF.SIGN_PIN)) == 0x6985  # wrong release for option 4
    assert tsm(applet, jpki.transition_pin(EF.SIGN_PIN)) == 0x9000  # FLOWS step 11
    assert state(applet) is PinState.INITIAL_RELEASED
    assert tsm(applet, jpki.transition_pin(EF.SIGN_PIN)) == 0x6985  # only from INITIAL
    # Released: the temporary PIN verifies, but only to be changed: still no signature.
    assert attack(applet) is False
    assert local_pin_setting(applet) == (0x9000, 0x9000)
    assert state(applet) is PinState.SET
    assert can_sign_with_real_pin(applet)


def test_option_6_puk_sets_the_first_pin(applet: JpkiApplet) -> None:
    assert tsm(applet, jpki.set_temporary_pin(EF.SIGN_PIN, TEMP, TemporaryPinMode.PUK, PUK)) \
        == 0x9000
    assert state(applet) is PinState.PUK_LOCKED
    assert attack(applet) is False
    assert local_pin_setting(applet) == (0x6984, 0x6982)
    user(applet, jpki.select_ef(EF.SIGN_PIN))
    assert user(applet, jpki.reset_retry_counter_with_puk(b"11111111", REAL)) == 0x63C9
    assert user(applet, jpki.reset_retry_counter_with_puk(PUK, b"bad pin")) == 0x6A80
    assert user(applet, CommandAPDU(0x00, 0x2C, 0x00, 0x80, PUK)) == 0x6700
    assert user(applet, CommandAPDU(0x00, 0x2C, 0x01, 0x80, PUK + REAL)) == 0x6A86
    assert user(applet, jpki.reset_retry_counter_with_puk(PUK, REAL)) == 0x9000
    assert state(applet) is PinState.SET
    assert applet.pin_status(EF.SIGN_PIN).puk_tries_left == 0
    assert user(applet, jpki.reset_retry_counter_with_puk(PUK, REAL)) == 0x6985  # PUK used up
    assert can_sign_with_real_pin(applet)


def test_option_6_puk_blocks_after_ten_wrong_tries(applet: JpkiApplet) -> None:
    tsm(applet, jpki.set_temporary_pin(EF.SIGN_PIN, TEMP, TemporaryPinMode.PUK, PUK))
    user(applet, jpki.select_ef(EF.SIGN_PIN))
    for left in range(9, -1, -1):
        assert user(applet, jpki.reset_retry_counter_with_puk(b"00000000", REAL)) == 0x63C0 | left
    assert user(applet, jpki.reset_retry_counter_with_puk(PUK, REAL)) == 0x6984


def test_reset_retry_counter_with_a_new_temporary_pin(applet: JpkiApplet) -> None:
    """The PIN reset flow: a blocked user PIN gets a fresh temporary PIN and counter."""
    tsm(applet, jpki.set_temporary_pin(EF.SIGN_PIN, TEMP, TemporaryPinMode.USABLE))
    local_pin_setting(applet)
    user(applet, jpki.select_ef(EF.SIGN_PIN))
    for _ in range(5):
        user(applet, jpki.verify(b"FORGOT"))
    assert state(applet) is PinState.EXHAUSTED
    assert tsm(applet, jpki.block_pin(EF.SIGN_PIN)) == 0x9000
    assert state(applet) is PinState.EXHAUSTED
    assert tsm(applet, jpki.set_temporary_pin(EF.SIGN_PIN, TEMP, TemporaryPinMode.BLOCKED)) \
        == 0x9000
    assert applet.pin_status(EF.SIGN_PIN) == jpki.PinStatus(PinState.TEMPORARY_BLOCKED, 5, 5, 0)
    tsm(applet, jpki.unblock_pin(EF.SIGN_PIN))
    assert local_pin_setting(applet) == (0x9000, 0x9000)
    assert can_sign_with_real_pin(applet)


def test_tsm_block_of_a_user_pin(applet: JpkiApplet) -> None:
    tsm(applet, jpki.set_temporary_pin(EF.SIGN_PIN, TEMP, TemporaryPinMode.USABLE))
    local_pin_setting(applet)
    assert tsm(applet, jpki.block_pin(EF.SIGN_PIN)) == 0x9000
    assert state(applet) is PinState.SET_BLOCKED
    assert tsm(applet, jpki.block_pin(EF.SIGN_PIN)) == 0x6985
    assert not can_sign_with_real_pin(applet)
    assert tsm(applet, jpki.unblock_pin(EF.SIGN_PIN)) == 0x9000
    assert can_sign_with_real_pin(applet)
    assert tsm(applet, jpki.block_pin(EF.AUTH_PIN)) == 0x6985  # no auth PIN set at all


# --- the state machine itself, under random command sequences --------------------------------

RULE = jpki.SIGN_PIN_RULE
pins = st.sampled_from([b"TEMP42", b"REAL99", b"OTHER1", b"x"])


class PinMachine(RuleBasedStateMachine):
    """A model of what each command may do; the Pin must agree after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.pin = Pin(RULE)
        self.value: bytes | None = None
        self.tries = 0

    @rule(value=st.sampled_from([b"TEMP42", b"REAL99"]), mode=st.sampled_from(TemporaryPinMode))
    def set_temporary(self, value: bytes, mode: TemporaryPinMode) -> None:
        puk = b"12345678" if mode is TemporaryPinMode.PUK else b""
        assert self.pin.set_temporary(value, mode, puk) == 0x9000
        self.value, self.tries = value, RULE.max_tries

    @rule(candidate=pins)
    def verify(self, candidate: bytes) -> None:
        usable = self.pin.phase in (Phase.TEMPORARY, Phase.INITIAL_RELEASED, Phase.SET) and (
            not self.pin.blocked_by_tsm
        )
        before = self.tries
        sw = self.pin.verify(candidate)
        if self.value is None:
            assert sw == 0x6A88
        elif not usable or before == 0:
            assert sw == 0x6984 and self.pin.tries_left == before
        elif candidate == self.value:
            assert sw == 0x9000
            self.tries = RULE.max_tries
        else:
            self.tries = before - 1
            assert sw == 0x63C0 | self.tries

    @precondition(lambda self: self.pin.verified)
    @rule(new=pins)
    def change(self, new: bytes) -> None:
        sw = self.pin.change(new)
        if RULE.accepts(new):
            assert sw == 0x9000 and self.pin.phase is Phase.SET
            self.value, self.tries = new, RULE.max_tries
        else:
            assert sw == 0x6A80

    @rule()
    def block(self) -> None:
        self.pin.block()

    @rule()
    def unblock(self) -> None:
        self.pin.unblock()

    @rule()
    def transition(self) -> None:
        self.pin.transition()

    @rule()
    def logout(self) -> None:
        self.pin.logout()

    @invariant()
    def counter_agrees(self) -> None:
        assert 0 <= self.pin.tries_left <= RULE.max_tries
        if self.value is not None:
            assert self.pin.tries_left == self.tries

    @invariant()
    def signing_only_when_verified_and_usable(self) -> None:
        if self.pin.allows_signing:
            assert self.pin.verified and not self.pin.blocked_by_tsm
            assert self.pin.phase in (Phase.TEMPORARY, Phase.SET)

    @invariant()
    def never_in_repr(self) -> None:
        assert b"TEMP42".decode() not in repr(self.pin)
        assert "REAL99" not in repr(self.pin)


TestPinMachine = PinMachine.TestCase
TestPinMachine.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


@given(st.binary(max_size=20))
def test_verify_never_crashes_on_any_bytes(candidate: bytes) -> None:
    pin = Pin(jpki.AUTH_PIN_RULE)
    pin.set_temporary(b"1234", TemporaryPinMode.USABLE)
    assert pin.verify(candidate) in (0x9000, 0x63C2)
