"""The UI app on a simulated phone: phases 1–4 of the seed, as screens and messages.

``AppCore`` is the app's logic with no I/O (events in, actions out, in the manner of h11):
it is told what the user typed, which card was tapped and which message arrived, and answers
with the screens to show and the messages to send. The phone's secure element and the
user's My Number Card are local hardware, reached synchronously through ``transmit``.
``PhoneApp`` is the thin async shell that moves messages over the phone's link and lets a
``VirtualUser`` answer the screens.

Secrets (the card's signing password, the user's new PINs, the TSM's temporary PINs) live
in ``Secret`` holders: redacted in repr, zeroed after use, and timed — how long each one sat
in the app's memory is recorded in ``AppCore.secret_holds`` (the PIN-option comparison
measures it). None of them is ever put in a message.
"""

# S105: names like "card_password" below are screen and field ids, not passwords.
# ruff: noqa: S105

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from device_sim.se.element import ScriptCommand, ScriptOutcome
from orchestrator import messages as om
from orchestrator.flows.pin_options import UserCode, strategy
from protocol import jpki as jp
from protocol.apdu import CommandAPDU, ResponseAPDU
from protocol.envelope import Message, build, time_ordered_id
from protocol.errors import CardError, JpkiError, StatusWord
from workers.tsm import messages as tsm

log = structlog.get_logger(__name__)


# ---------------------------------------------------------------------------------------
# Secrets held by the app


@dataclass(frozen=True, slots=True)
class SecretHold:
    """How long one secret stayed in app memory, from the keystroke to its wipe."""

    kind: str  # SecretKind value
    saga_id: str | None
    held_s: float


class SecretKind(enum.StrEnum):
    CARD_SIGNING_PASSWORD = "card_signing_password"
    AUTH_PIN = "auth_pin"  # the phone's user-authentication PIN (4 digits)
    SIGNING_PASSWORD = "signing_password"  # the phone's signing password (6-16 [A-Z0-9])
    TEMPORARY_PIN = "temporary_pin"
    PUK = "puk"  # option 6: handed to the user, who types it with the new PIN


class Secret:
    """A PIN or password: never in repr or logs, zeroed by ``wipe``, its lifetime recorded."""

    __slots__ = ("_value", "kind", "created_at")

    def __init__(self, value: bytes | str, kind: SecretKind, created_at: float) -> None:
        self._value = bytearray(value.encode("ascii") if isinstance(value, str) else value)
        self.kind = kind
        self.created_at = created_at

    def reveal(self) -> bytes:
        if not self._value:
            raise SecretWiped(f"{self.kind} was already wiped")
        return bytes(self._value)

    def matches(self, other: Secret) -> bool:
        return hmac.compare_digest(bytes(self._value), bytes(other._value))

    def wipe(self) -> None:
        for i in range(len(self._value)):
            self._value[i] = 0
        self._value = bytearray()

    @property
    def wiped(self) -> bool:
        return not self._value

    def __repr__(self) -> str:
        return f"Secret({self.kind}, redacted)"

    __str__ = __repr__


class SecretWiped(JpkiError):
    """A wiped secret was used again: a bug in the app's flow, not the user's fault."""


# ---------------------------------------------------------------------------------------
# Screens: what the user sees and is asked, as data


class ScreenId(enum.StrEnum):
    WELCOME = "welcome"  # phase 1: choose certificates
    PREPARING = "preparing"  # phase 2: the SE is being prepared (no input)
    CARD_PASSWORD = "card_password"  # phase 3: the card's signing password
    TAP_CARD = "tap_card"  # phase 3: hold the card to the phone
    ISSUING = "issuing"  # phase 3: keys and certificates being made (no input)
    SET_AUTH_PIN = "set_auth_pin"  # phase 3: choose the phone's user-authentication PIN
    SET_SIGNING_PASSWORD = "set_signing_password"  # phase 3: choose the phone's signing password
    DELIVERED_CODE = "delivered_code"  # phase 3, options 1 and 6: the user is handed a code
    ENTER_CODE = "enter_code"  # phase 3, options 1 and 6: the user types that code
    READY = "ready"  # phase 4
    REFUSED = "refused"  # not eligible, with the reason
    FAILED = "failed"  # issuance failed, with the reason
    LOGIN_PIN = "login_pin"  # phase 4: a service asks the user to log in


class InputKind(enum.StrEnum):
    CHOICE = "choice"
    SECRET = "secret"  # a PIN or password typed by the user
    CARD_TAP = "card_tap"  # the user holds the My Number Card to the phone
    ACKNOWLEDGE = "acknowledge"


@dataclass(frozen=True, slots=True)
class Input:
    name: str
    kind: InputKind
    label: str
    choices: tuple[str, ...] = ()
    rule: str = ""  # what a valid answer looks like, shown to the user


@dataclass(frozen=True, slots=True)
class Screen:
    id: ScreenId
    phase: int
    title: str
    text: str
    inputs: tuple[Input, ...] = ()
    notice: str = ""  # e.g. "wrong password, 4 tries left"
    # Options 1 and 6: the code handed to the user (a letter in a real rollout).
    shown: Secret | None = field(default=None, repr=False, compare=False)


def _rule_text(rule: jp.PinRule) -> str:
    return f"{rule.min_length}-{rule.max_length} characters of [{rule.alphabet}]"


AUTH_PIN_RULE = _rule_text(jp.AUTH_PIN_RULE)
SIGNING_PASSWORD_RULE = _rule_text(jp.SIGN_PIN_RULE)

CERTIFICATE_CHOICES = {
    "both": (om.CertificateKind.AUTH, om.CertificateKind.SIGN),
    "auth": (om.CertificateKind.AUTH,),
    "sign": (om.CertificateKind.SIGN,),
}


def welcome_screen() -> Screen:
    return Screen(
        ScreenId.WELCOME,
        1,
        "Smartphone JPKI",
        "Put your My Number Card's certificates on this phone. Which do you want?",
        (
            Input(
                "certificates",
                InputKind.CHOICE,
                "Certificates",
                ("both", "auth", "sign"),
                "user authentication, digital signature, or both",
            ),
        ),
    )


def card_password_screen(tries_left: int | None = None) -> Screen:
    return Screen(
        ScreenId.CARD_PASSWORD,
        3,
        "Your My Number Card",
        "Enter the signing password of your My Number Card (not a phone PIN).",
        (
            Input(
                "card_password",
                InputKind.SECRET,
                "Card signing password",
                rule=SIGNING_PASSWORD_RULE,
            ),
        ),
        notice=""
        if tries_left is None
        else f"Wrong password: {tries_left} tries left on the card.",
    )


def tap_card_screen() -> Screen:
    return Screen(
        ScreenId.TAP_CARD,
        3,
        "Read your card",
        "Hold your My Number Card to the back of the phone until it is read.",
        (Input("card", InputKind.CARD_TAP, "My Number Card"),),
    )


def set_pin_screen(kind: om.CertificateKind, notice: str = "") -> Screen:
    if kind is om.CertificateKind.AUTH:
        return Screen(
            ScreenId.SET_AUTH_PIN,
            3,
            "User-authentication PIN",
            "Choose the PIN you will use to log in with this phone. It stays on this phone.",
            (
                Input("pin", InputKind.SECRET, "New PIN", rule=AUTH_PIN_RULE),
                Input("confirm", InputKind.SECRET, "New PIN again", rule=AUTH_PIN_RULE),
            ),
            notice,
        )
    return Screen(
        ScreenId.SET_SIGNING_PASSWORD,
        3,
        "Signing password",
        "Choose the password you will use to sign with this phone. It stays on this phone.",
        (
            Input("pin", InputKind.SECRET, "New signing password", rule=SIGNING_PASSWORD_RULE),
            Input(
                "confirm",
                InputKind.SECRET,
                "New signing password again",
                rule=SIGNING_PASSWORD_RULE,
            ),
        ),
        notice,
    )


CODE_NAMES = {UserCode.TEMPORARY_PIN: "temporary PIN", UserCode.PUK: "PUK"}


def _pin_name(kind: om.CertificateKind) -> str:
    return "user-authentication PIN" if kind is om.CertificateKind.AUTH else "signing password"


def delivered_code_screen(kind: om.CertificateKind, code: UserCode, secret: Secret) -> Screen:
    """Options 1 and 6: the code the user must keep and type (the seed's extra user step)."""
    return Screen(
        ScreenId.DELIVERED_CODE,
        3,
        f"Your {CODE_NAMES[code]}",
        f"Keep this {CODE_NAMES[code]} for your {_pin_name(kind)}; you will type it next.",
        (Input("ok", InputKind.ACKNOWLEDGE, "I have it"),),
        shown=secret,
    )


def enter_code_screen(kind: om.CertificateKind, code: UserCode, notice: str = "") -> Screen:
    return Screen(
        ScreenId.ENTER_CODE,
        3,
        f"Enter your {CODE_NAMES[code]}",
        f"Type the {CODE_NAMES[code]} you were given for your {_pin_name(kind)}.",
        (Input("code", InputKind.SECRET, CODE_NAMES[code].capitalize()),),
        notice,
    )


def progress_screen(screen_id: ScreenId, phase: int, text: str) -> Screen:
    return Screen(screen_id, phase, "Please wait", text)


def ready_screen(certificates: Sequence[om.CertificateKind], model_change: bool) -> Screen:
    names = ", ".join(
        "user authentication" if c is om.CertificateKind.AUTH else "digital signature"
        for c in certificates
    )
    text = f"Your phone now holds: {names}."
    if model_change:
        text += " The certificates on your previous phone were revoked."
    return Screen(ScreenId.READY, 4, "Ready", text, (Input("ok", InputKind.ACKNOWLEDGE, "OK"),))


REASON_TEXT: dict[om.Reason, str] = {
    om.Reason.UNSUPPORTED_MODEL: "This phone model does not support Smartphone JPKI.",
    om.Reason.UNSUPPORTED_OS: "Update your phone's operating system to use Smartphone JPKI.",
    om.Reason.NO_SECURE_ELEMENT: "This phone has no secure element.",
    om.Reason.CARD_CERTIFICATE_REVOKED: "Your card's certificate is revoked: renew the card.",
    om.Reason.CARD_CERTIFICATE_EXPIRED: "Your card's certificate has expired: renew the card.",
    om.Reason.CARD_PASSWORD_BLOCKED: "Your card's signing password is blocked: see your city.",
}


def outcome_screen(result: om.Result) -> Screen:
    reason = result.reason or om.Reason.INTERNAL
    text = REASON_TEXT.get(reason, f"The application did not complete ({reason.value}). Try again.")
    screen_id = ScreenId.REFUSED if result.outcome is om.Outcome.REFUSED else ScreenId.FAILED
    return Screen(
        screen_id, result.phase, "Not completed", text, (Input("ok", InputKind.ACKNOWLEDGE, "OK"),)
    )


def login_screen(service: str, notice: str = "") -> Screen:
    return Screen(
        ScreenId.LOGIN_PIN,
        4,
        f"Log in to {service}",
        "Enter your user-authentication PIN.",
        (Input("pin", InputKind.SECRET, "PIN", rule=AUTH_PIN_RULE),),
        notice,
    )


# ---------------------------------------------------------------------------------------
# Local hardware the app talks to: the SE (built in) and the card (over NFC)


class ApduChannel(Protocol):
    def transmit(self, command: bytes) -> bytes: ...


class SecureElementPort(ApduChannel, Protocol):
    """The phone's SE as the app reaches it (OMAPI): APDUs, and SP-TSM scripts to relay."""

    def run_script(self, script: Iterable[ScriptCommand]) -> ScriptOutcome: ...


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """What phase 1 reports about the phone (FLOWS.md §1 step 1)."""

    device_id: str
    model: str
    os_name: str
    os_version: str
    se_present: bool


def _exchange(channel: ApduChannel, command: CommandAPDU) -> ResponseAPDU:
    return ResponseAPDU.from_bytes(channel.transmit(command.to_bytes()))


def _run_ok(channel: ApduChannel, command: CommandAPDU, what: str) -> bytes:
    return jp.expect_ok(_exchange(channel, command), what)


def read_file(channel: ApduChannel, fid: int) -> bytes:
    """SELECT EF and READ BINARY a whole DER object, its length taken from its own header."""
    _run_ok(channel, jp.select_ef(fid), "SELECT EF")
    head = _run_ok(channel, jp.read_binary(0, 4), "READ BINARY")
    if len(head) < 2 or head[0] != 0x30:
        raise CardError(StatusWord.WRONG_DATA, "READ BINARY (not a DER SEQUENCE)")
    if head[1] < 0x80:
        total = 2 + head[1]
    elif head[1] in (0x81, 0x82) and len(head) >= 2 + (head[1] - 0x80):
        width = head[1] - 0x80
        total = 2 + width + int.from_bytes(head[2 : 2 + width], "big")
    else:
        raise CardError(StatusWord.WRONG_DATA, "READ BINARY (DER length)")
    out = bytearray()
    while len(out) < total:
        chunk = _run_ok(
            channel, jp.read_binary(len(out), min(256, total - len(out))), "READ BINARY"
        )
        if not chunk:
            raise CardError(StatusWord.WRONG_LENGTH, "READ BINARY (short file)")
        out += chunk
    return bytes(out[:total])


def sign_sha256(channel: ApduChannel, key_ef: int, data: bytes) -> bytes:
    _run_ok(channel, jp.select_ef(key_ef), "SELECT EF")
    digest = jp.digest_info("sha256", hashlib.sha256(data).digest())
    return _run_ok(channel, jp.compute_digital_signature(digest), "COMPUTE DIGITAL SIGNATURE")


def verify_pin(channel: ApduChannel, pin_ef: int, pin: Secret) -> int:
    """SELECT the PIN EF and VERIFY; returns the status word (``63Cx`` is not an exception)."""
    _run_ok(channel, jp.select_ef(pin_ef), "SELECT EF")
    return _exchange(channel, jp.verify(pin.reveal())).sw


# ---------------------------------------------------------------------------------------
# What the core asks its shell to do


@dataclass(frozen=True, slots=True)
class Show:
    screen: Screen


@dataclass(frozen=True, slots=True)
class Send:
    """Publish on the phone's up link; the envelope's saga id correlates it."""

    body: Any
    saga_id: str | None = None
    causation_id: str | None = None


@dataclass(frozen=True, slots=True)
class LoginSigned:
    """Phase 4: what goes to the relying party (certificate read from EF 000A, signature)."""

    challenge_id: str
    nonce: bytes
    certificate: bytes
    signature: bytes


@dataclass(frozen=True, slots=True)
class Finished:
    """An issuance (or a login) is over, as far as the app is concerned."""

    what: str  # "issuance" | "login"
    outcome: str
    phase: int
    reason: str | None = None


Action = Show | Send | LoginSigned | Finished


class Step(enum.StrEnum):
    """Where the issuance stands, from the app's side."""

    CHOOSING = "choosing"
    COLLECTING_PINS = "collecting_pins"  # option 5: the real PINs, typed at application
    ENROLLED = "enrolled"  # enrolment sent; phase 2 runs as TSM scripts on the SE
    CARD_PASSWORD = "card_password"
    TAP_CARD = "tap_card"
    WAITING_RELEASE = "waiting_release"  # card signed; keys, certificates and temp PINs on the way
    SETTING_PINS = "setting_pins"
    CONFIRMING = "confirming"  # PINs set; waiting for the result
    DONE = "done"


@dataclass(slots=True)
class Issuance:
    application_id: str
    certificates: tuple[om.CertificateKind, ...] = ()
    pin_option: om.PinOption = om.DEFAULT_PIN_OPTION
    step: Step = Step.CHOOSING
    request: om.CardSignatureRequest | None = None
    request_message_id: str | None = None
    card_password: Secret | None = field(default=None, repr=False)
    go_ahead: om.PinSettingGoAhead | None = None
    temporary_pins: dict[om.CertificateKind, Secret] = field(default_factory=dict, repr=False)
    puks: dict[om.CertificateKind, Secret] = field(default_factory=dict, repr=False)  # option 6
    new_pins: dict[om.CertificateKind, Secret] = field(default_factory=dict, repr=False)
    pins_to_set: list[om.CertificateKind] = field(default_factory=list)
    result: om.Result | None = None


@dataclass(slots=True)
class Login:
    service: str
    challenge_id: str
    nonce: bytes


@dataclass(slots=True)
class AppStorage:
    """The app's own storage: gone with a reinstall or a factory reset (the SE stays)."""

    app_instance_id: str
    phase: int = 1
    certificates: list[str] = field(default_factory=list)
    last_application_id: str | None = None

    def to_state(self) -> dict[str, Any]:
        return {
            "app_instance_id": self.app_instance_id,
            "phase": self.phase,
            "certificates": list(self.certificates),
            "last_application_id": self.last_application_id,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> AppStorage:
        return cls(
            app_instance_id=str(state["app_instance_id"]),
            phase=int(state["phase"]),
            certificates=[str(c) for c in state.get("certificates", [])],
            last_application_id=state.get("last_application_id"),
        )


class UnexpectedInput(JpkiError):
    """An answer to a screen that is not showing: a bug in the caller, never the user's."""


DELETED_MARK = "(deleted)"
GP_DELETE = 0xE4


def _deleted_an_applet(script: tsm.SeScript, outcome: ScriptOutcome) -> bool:
    """Whether a GP DELETE of the script succeeded. SCP03 hides command data, not the header
    (GP Amd D §6.2.5), and the status word stays in clear: the phone can tell."""
    return any(
        len(step.apdu) > 1 and step.apdu[1] == GP_DELETE and response[-2:] == b"\x90\x00"
        for step, response in zip(script.steps, outcome.responses, strict=False)
    )


# Enough to answer a redelivered script of the saga in progress (a saga runs four or five).
SCRIPT_RESULTS_KEPT = 16
PIN_RULE_OF = {om.CertificateKind.AUTH: jp.AUTH_PIN_RULE, om.CertificateKind.SIGN: jp.SIGN_PIN_RULE}
PIN_EF_OF = {om.CertificateKind.AUTH: jp.EF.AUTH_PIN, om.CertificateKind.SIGN: jp.EF.SIGN_PIN}
NEW_PIN_KIND = {
    om.CertificateKind.AUTH: SecretKind.AUTH_PIN,
    om.CertificateKind.SIGN: SecretKind.SIGNING_PASSWORD,
}


class AppCore:
    """The UI app's logic: events in (inputs, card taps, messages), actions out. No I/O."""

    def __init__(
        self,
        device: DeviceInfo,
        se: SecureElementPort | None,
        se_identity: om.SeIdentity | None,
        storage: AppStorage | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        new_id: Callable[[], str] = time_ordered_id,
    ) -> None:
        self.device = device
        self.se = se
        self.se_identity = se_identity
        self._clock = clock
        self._new_id = new_id
        self.storage = storage or AppStorage(app_instance_id=new_id())
        self.issuance: Issuance | None = None
        self.login: Login | None = None
        self.secret_holds: list[SecretHold] = []
        self.screens_shown: list[Screen] = []
        # SP-TSM operations relayed to the SE, in order; "(deleted)" marks a DELETE done
        self.scripts_run: list[str] = []
        self._script_results: OrderedDict[str, tsm.SeScriptResult] = OrderedDict()

    # -- bookkeeping ---------------------------------------------------------------------

    def _show(self, screen: Screen) -> Show:
        self.screens_shown.append(screen)
        return Show(screen)

    def _secret(self, value: object, kind: SecretKind) -> Secret:
        if isinstance(value, Secret):
            return value
        if not isinstance(value, str | bytes):
            raise UnexpectedInput(f"{kind} must be typed as text")
        return Secret(value, kind, self._clock())

    def _wipe(self, secret: Secret | None) -> None:
        if secret is None or secret.wiped:
            return
        saga_id = self.issuance.application_id if self.issuance else None
        self.secret_holds.append(
            SecretHold(secret.kind.value, saga_id, self._clock() - secret.created_at)
        )
        secret.wipe()

    def _expect(self, step: Step) -> Issuance:
        if self.issuance is None or self.issuance.step is not step:
            current = self.issuance.step.value if self.issuance else "none"
            raise UnexpectedInput(f"issuance is at {current}, not {step.value}")
        return self.issuance

    # -- phase 1 -------------------------------------------------------------------------

    def start_issuance(self) -> list[Action]:
        self.issuance = Issuance(application_id=self._new_id())
        return [self._show(welcome_screen())]

    def answer(self, screen_id: ScreenId, values: Mapping[str, Any]) -> list[Action]:
        """The user answered ``screen_id``; ``values`` maps each input's name to the answer."""
        handler = {
            ScreenId.WELCOME: self._on_choice,
            ScreenId.CARD_PASSWORD: self._on_card_password,
            ScreenId.TAP_CARD: self._on_card_tap,
            ScreenId.SET_AUTH_PIN: self._on_new_pin,
            ScreenId.SET_SIGNING_PASSWORD: self._on_new_pin,
            ScreenId.DELIVERED_CODE: self._on_code_delivered,
            ScreenId.ENTER_CODE: self._on_code,
            ScreenId.LOGIN_PIN: self._on_login_pin,
            ScreenId.READY: lambda _values: [],
            ScreenId.REFUSED: lambda _values: [],
            ScreenId.FAILED: lambda _values: [],
        }.get(screen_id)
        if handler is None:
            raise UnexpectedInput(f"screen {screen_id} takes no input")
        return handler(values)

    def _on_choice(self, values: Mapping[str, Any]) -> list[Action]:
        issuance = self._expect(Step.CHOOSING)
        choice = CERTIFICATE_CHOICES.get(str(values.get("certificates")))
        if choice is None:
            return [self._show(welcome_screen())]
        issuance.certificates = choice
        issuance.pin_option = om.PinOption(values.get("pin_option", om.DEFAULT_PIN_OPTION))
        if strategy(issuance.pin_option).real_pin_at_application:
            # Option 5: the real PINs first; the app holds them until the SE is ready.
            issuance.step = Step.COLLECTING_PINS
            issuance.pins_to_set = sorted(set(choice))
            return [self._show(set_pin_screen(issuance.pins_to_set[0]))]
        return self._enrol(issuance)

    def _enrol(self, issuance: Issuance) -> list[Action]:
        choice = issuance.certificates
        issuance.step = Step.ENROLLED
        self.storage.last_application_id = issuance.application_id
        enrolment = om.Enrolment(
            application_id=issuance.application_id,
            device_id=self.device.device_id,
            app_instance_id=self.storage.app_instance_id,
            model=self.device.model,
            os_name=self.device.os_name,
            os_version=self.device.os_version,
            se_present=self.device.se_present and self.se_identity is not None,
            se=self.se_identity,
            certificates=list(choice),
            pin_option=issuance.pin_option,
        )
        log.info(
            "enrolment_sent",
            device_id=self.device.device_id,
            saga_id=issuance.application_id,
            certificates=[c.value for c in choice],
        )
        return [
            Send(enrolment, saga_id=issuance.application_id),
            self._show(
                progress_screen(ScreenId.PREPARING, 2, "Preparing your phone's secure element.")
            ),
        ]

    # -- messages from the backend -------------------------------------------------------

    def receive(self, message: Message) -> list[Action]:
        body = message.body
        if isinstance(body, tsm.SeScript):
            return self._on_script(message, body)
        if isinstance(body, om.CardSignatureRequest):
            return self._on_card_signature_request(message, body)
        if isinstance(body, om.PinSettingGoAhead):
            return self._on_go_ahead(message, body)
        if isinstance(body, om.Result):
            return self._on_result(message, body)
        log.warning("message_ignored", type=message.envelope.type, device_id=self.device.device_id)
        return []

    def _on_script(self, message: Message, script: tsm.SeScript) -> list[Action]:
        """Relay an SP-TSM script to the SE (its content is SCP03-protected: the app cannot
        read or change it) and answer with the responses. A release script also hands the
        app the temporary PIN(s) to use at once for local PIN setting."""
        result = self._script_results.get(script.script_id)
        if result is not None:
            # At-least-once delivery: a script delivered twice must not run twice (a second
            # GENERATE KEY PAIR would replace the keys); the first answer is sent again.
            return [Send(result, message.envelope.saga_id, message.envelope.message_id)]
        if self.se is None:
            outcome = ScriptOutcome((), completed=False)
        else:
            outcome = self.se.run_script(
                ScriptCommand(step.apdu, tuple(step.expect)) for step in script.steps
            )
        self.scripts_run.append(
            script.operation + (DELETED_MARK if _deleted_an_applet(script, outcome) else "")
        )
        result = tsm.SeScriptResult(
            script_id=script.script_id,
            responses=list(outcome.responses),
            completed=outcome.completed,
        )
        self._script_results[script.script_id] = result
        while len(self._script_results) > SCRIPT_RESULTS_KEPT:
            self._script_results.popitem(last=False)
        actions: list[Action] = [
            Send(result, message.envelope.saga_id, message.envelope.message_id)
        ]
        if script.temporary_pins and outcome.completed:
            pins = {pin.kind: pin.pin.encode("ascii") for pin in script.temporary_pins}
            puks = {p.kind: p.puk.encode("ascii") for p in script.temporary_pins if p.puk}
            actions += self.temporary_pins_received(message.envelope.saga_id, pins, puks)
        return actions

    def _current(self, message: Message) -> Issuance | None:
        issuance = self.issuance
        if issuance is None or message.envelope.saga_id != issuance.application_id:
            log.info(
                "stale_message",
                type=message.envelope.type,
                saga_id=message.envelope.saga_id,
                device_id=self.device.device_id,
            )
            return None
        return issuance

    # -- phase 3: the card signature -----------------------------------------------------

    def _on_card_signature_request(
        self, message: Message, request: om.CardSignatureRequest
    ) -> list[Action]:
        issuance = self._current(message)
        if issuance is None:
            return []
        if issuance.step in (Step.CARD_PASSWORD, Step.TAP_CARD):
            return []  # a redelivered request while the user is already at it
        if issuance.step is not Step.ENROLLED:
            return []
        application = request.application
        # Before the card signs, the app checks the application is this phone's own.
        if (
            application.device_id != self.device.device_id
            or application.app_instance_id != self.storage.app_instance_id
            or application.se != self.se_identity
            or sorted(set(application.certificates)) != sorted(set(issuance.certificates))
            or application.pin_option not in (None, issuance.pin_option)
        ):
            return self._abort(om.AbortStage.CARD_SIGNATURE, om.Reason.BAD_APPLICATION)
        issuance.request = request
        issuance.request_message_id = message.envelope.message_id
        issuance.step = Step.CARD_PASSWORD
        return [self._show(card_password_screen())]

    def _on_card_password(self, values: Mapping[str, Any]) -> list[Action]:
        issuance = self._expect(Step.CARD_PASSWORD)
        password = self._secret(values.get("card_password", ""), SecretKind.CARD_SIGNING_PASSWORD)
        if not jp.SIGN_PIN_RULE.accepts(password.reveal()):
            self._wipe(password)
            return [self._show(card_password_screen())]
        issuance.card_password = password
        issuance.step = Step.TAP_CARD
        return [self._show(tap_card_screen())]

    def _on_card_tap(self, values: Mapping[str, Any]) -> list[Action]:
        issuance = self._expect(Step.TAP_CARD)
        card = values.get("card")
        password = issuance.card_password
        request = issuance.request
        if request is None or password is None:
            raise UnexpectedInput("card tapped before the card password was given")
        if card is None:
            self._wipe(password)
            return self._abort(om.AbortStage.CARD_SIGNATURE, om.Reason.CARD_NOT_READ)
        try:
            _run_ok(card, jp.select_ap(), "SELECT AP")
            sw = verify_pin(card, jp.EF.SIGN_PIN, password)
            self._wipe(password)
            issuance.card_password = None
            if sw in (0x63C0, StatusWord.REFERENCE_DATA_BLOCKED, StatusWord.AUTHENTICATION_BLOCKED):
                return self._abort(om.AbortStage.CARD_SIGNATURE, om.Reason.CARD_PASSWORD_BLOCKED)
            tries = jp.tries_from_sw(sw)
            if tries is not None:
                issuance.step = Step.CARD_PASSWORD
                return [self._show(card_password_screen(tries))]
            if sw != StatusWord.OK:
                raise CardError(sw, "VERIFY")
            certificate = read_file(card, jp.EF.SIGN_CERT)
            signature = sign_sha256(card, jp.EF.SIGN_KEY, request.application.to_be_signed())
            _exchange(card, jp.select_ap())  # logout: the card forgets the verified password
        except JpkiError as exc:
            self._wipe(password)
            log.info("card_read_failed", device_id=self.device.device_id, error=type(exc).__name__)
            return self._abort(om.AbortStage.CARD_SIGNATURE, om.Reason.CARD_NOT_READ)
        issuance.step = Step.WAITING_RELEASE
        answer = om.CardSignature(
            nonce=request.application.nonce, signature=signature, card_certificate=certificate
        )
        return [
            Send(answer, saga_id=issuance.application_id, causation_id=issuance.request_message_id),
            self._show(progress_screen(ScreenId.ISSUING, 3, "Issuing your certificates.")),
        ]

    # -- phase 3: local PIN setting ------------------------------------------------------

    def temporary_pins_received(
        self,
        saga_id: str | None,
        pins: Mapping[om.CertificateKind, bytes],
        puks: Mapping[om.CertificateKind, bytes] | None = None,
    ) -> list[Action]:
        """The TSM's temporary PIN(s), for this saga. Never shown; wiped once used."""
        issuance = self.issuance
        if (
            issuance is None
            or saga_id != issuance.application_id
            or issuance.step
            in (
                Step.CONFIRMING,
                Step.DONE,
            )
        ):
            return []
        for kind, pin in pins.items():
            self._wipe(issuance.temporary_pins.pop(kind, None))
            issuance.temporary_pins[kind] = Secret(pin, SecretKind.TEMPORARY_PIN, self._clock())
        for kind, puk in (puks or {}).items():
            self._wipe(issuance.puks.pop(kind, None))
            issuance.puks[kind] = Secret(puk, SecretKind.PUK, self._clock())
        return self._maybe_ask_pins(issuance)

    def _on_go_ahead(self, message: Message, go_ahead: om.PinSettingGoAhead) -> list[Action]:
        issuance = self._current(message)
        if issuance is None or issuance.go_ahead is not None:
            return []
        issuance.go_ahead = go_ahead
        return self._maybe_ask_pins(issuance)

    def _maybe_ask_pins(self, issuance: Issuance) -> list[Action]:
        go_ahead = issuance.go_ahead
        if issuance.step is not Step.WAITING_RELEASE or go_ahead is None:
            return []
        if not all(kind in issuance.temporary_pins for kind in go_ahead.certificates):
            return []  # the TSM's message has not arrived yet
        issuance.pins_to_set = sorted(set(go_ahead.certificates))
        issuance.step = Step.SETTING_PINS
        if strategy(issuance.pin_option).real_pin_at_application:
            return self._set_held_pins(issuance)
        return self._ask_pin(issuance)

    def _ask_pin(self, issuance: Issuance) -> list[Action]:
        kind = issuance.pins_to_set[0]
        code = strategy(issuance.pin_option).user_code
        if code is UserCode.NONE:
            return [self._show(set_pin_screen(kind))]
        held = issuance.puks if code is UserCode.PUK else issuance.temporary_pins
        secret = held.get(kind)
        if secret is None:
            return self._abort(om.AbortStage.PIN_SETTING, om.Reason.PIN_SETTING_FAILED)
        return [self._show(delivered_code_screen(kind, code, secret))]

    def _on_code_delivered(self, values: Mapping[str, Any]) -> list[Action]:
        """The user has the code; the app no longer keeps its copy."""
        issuance = self._expect(Step.SETTING_PINS)
        kind = issuance.pins_to_set[0]
        self._wipe(issuance.puks.pop(kind, None))
        self._wipe(issuance.temporary_pins.pop(kind, None))
        return [self._show(set_pin_screen(kind))]

    def _set_held_pins(self, issuance: Issuance) -> list[Action]:
        """Option 5: VERIFY the temporary PIN and CHANGE it to the PIN typed at application."""
        while issuance.pins_to_set:
            kind = issuance.pins_to_set[0]
            temporary = issuance.temporary_pins.pop(kind)
            failed = self._put_first_pin(issuance, kind, temporary, with_puk=False)
            if failed:
                return failed
        return self._pins_done(issuance)

    def _on_code(self, values: Mapping[str, Any]) -> list[Action]:
        """Options 1 and 6: the user typed the code; a wrong one costs a try and is asked again."""
        issuance = self._expect(Step.SETTING_PINS)
        kind = issuance.pins_to_set[0]
        code = strategy(issuance.pin_option).user_code
        secret = self._secret(values.get("code", ""), SecretKind(code.value))
        rule = jp.PUK_RULE if code is UserCode.PUK else PIN_RULE_OF[kind]
        if secret.wiped or not rule.accepts(secret.reveal()):
            # Not even the code's format: asked again without spending a try on the SE.
            self._wipe(secret)
            notice = f"A {CODE_NAMES[code]} is {rule.min_length}-{rule.max_length} characters."
            return [self._show(enter_code_screen(kind, code, notice))]
        failed = self._put_first_pin(issuance, kind, secret, with_puk=code is UserCode.PUK)
        if failed:
            return failed
        if issuance.pins_to_set:
            return self._ask_pin(issuance)
        return self._pins_done(issuance)

    def _put_first_pin(
        self, issuance: Issuance, kind: om.CertificateKind, code: Secret, *, with_puk: bool
    ) -> list[Action]:
        """The first PIN onto the SE with ``code`` (temporary PIN, or PUK for option 6).

        Returns nothing on success (``kind`` leaves ``pins_to_set``), else what to show.
        """
        new_pin = issuance.new_pins[kind]
        try:
            if self.se is None:
                raise CardError(StatusWord.CONDITIONS_NOT_SATISFIED, "no secure element")
            _run_ok(self.se, jp.select_ap(), "SELECT AP")
            if with_puk:
                _run_ok(self.se, jp.select_ef(PIN_EF_OF[kind]), "SELECT EF")
                command = jp.reset_retry_counter_with_puk(code.reveal(), new_pin.reveal())
                sw = _exchange(self.se, command).sw
            else:
                sw = verify_pin(self.se, PIN_EF_OF[kind], code)
                if sw == StatusWord.OK:
                    sw = _exchange(self.se, jp.change_reference_data(new_pin.reveal())).sw
            _exchange(self.se, jp.select_ap())
        except CardError as exc:
            sw = exc.sw
        self._wipe(code)
        tries = jp.tries_from_sw(sw)
        user_code = strategy(issuance.pin_option).user_code
        if tries and user_code is not UserCode.NONE:
            log.info("code_mistyped", device_id=self.device.device_id, tries_left=tries)
            notice = f"Wrong {CODE_NAMES[user_code]}: {tries} tries left."
            return [self._show(enter_code_screen(kind, user_code, notice))]
        if sw != StatusWord.OK:
            self._wipe(issuance.new_pins.pop(kind))
            log.info("pin_setting_failed", device_id=self.device.device_id, sw=f"{sw:04X}")
            return self._abort(om.AbortStage.PIN_SETTING, om.Reason.PIN_SETTING_FAILED, sw)
        self._wipe(issuance.new_pins.pop(kind))
        issuance.pins_to_set.pop(0)
        return []

    def _pins_done(self, issuance: Issuance) -> list[Action]:
        issuance.step = Step.CONFIRMING
        certificates = sorted(set(issuance.go_ahead.certificates)) if issuance.go_ahead else []
        return [
            Send(om.PinsSet(certificates=certificates), saga_id=issuance.application_id),
            self._show(progress_screen(ScreenId.ISSUING, 3, "Activating your certificates.")),
        ]

    def _on_new_pin(self, values: Mapping[str, Any]) -> list[Action]:
        issuance = self.issuance
        if issuance is None or issuance.step is not Step.COLLECTING_PINS:
            issuance = self._expect(Step.SETTING_PINS)
        kind = issuance.pins_to_set[0]
        new_pin = self._secret(values.get("pin", ""), NEW_PIN_KIND[kind])
        confirm = self._secret(values.get("confirm", ""), NEW_PIN_KIND[kind])
        rule = PIN_RULE_OF[kind]
        notice = ""
        if not rule.accepts(new_pin.reveal()):
            notice = f"The {rule.name} must be {rule.min_length}-{rule.max_length} characters."
        elif not new_pin.matches(confirm):
            notice = "The two entries differ. Please type them again."
        self._wipe(confirm)
        if notice:
            self._wipe(new_pin)
            return [self._show(set_pin_screen(kind, notice))]
        self._wipe(issuance.new_pins.pop(kind, None))
        issuance.new_pins[kind] = new_pin
        if issuance.step is Step.COLLECTING_PINS:
            issuance.pins_to_set.pop(0)
            if issuance.pins_to_set:
                return [self._show(set_pin_screen(issuance.pins_to_set[0]))]
            return self._enrol(issuance)
        code = strategy(issuance.pin_option).user_code
        if code is not UserCode.NONE:
            return [self._show(enter_code_screen(kind, code))]
        temporary = issuance.temporary_pins.pop(kind)
        failed = self._put_first_pin(issuance, kind, temporary, with_puk=False)
        if failed:
            return failed
        if issuance.pins_to_set:
            return [self._show(set_pin_screen(issuance.pins_to_set[0]))]
        return self._pins_done(issuance)

    # -- endings -------------------------------------------------------------------------

    def _abort(
        self, stage: om.AbortStage, reason: om.Reason, status_word: int | None = None
    ) -> list[Action]:
        issuance = self.issuance
        if issuance is None:
            return []
        self._wipe(issuance.card_password)
        self._wipe_pin_secrets(issuance)
        issuance.step = Step.DONE
        result = om.Result(outcome=om.Outcome.CANCELLED, phase=self.storage.phase, reason=reason)
        issuance.result = result
        return [
            Send(
                om.Aborted(stage=stage, reason=reason, status_word=status_word),
                saga_id=issuance.application_id,
            ),
            self._show(outcome_screen(result)),
            Finished("issuance", result.outcome.value, result.phase, reason.value),
        ]

    def _wipe_pin_secrets(self, issuance: Issuance) -> None:
        for held in (issuance.temporary_pins, issuance.puks, issuance.new_pins):
            for secret in held.values():
                self._wipe(secret)
            held.clear()

    def _on_result(self, message: Message, result: om.Result) -> list[Action]:
        issuance = self._current(message)
        if issuance is None or issuance.step is Step.DONE:
            return []
        self._wipe(issuance.card_password)
        self._wipe_pin_secrets(issuance)
        issuance.step = Step.DONE
        issuance.result = result
        self.storage.phase = result.phase
        if result.outcome is om.Outcome.ISSUED:
            self.storage.certificates = [c.value for c in result.certificates]
            screen = ready_screen(result.certificates, result.model_change)
        else:
            screen = outcome_screen(result)
        reason = result.reason.value if result.reason else None
        return [
            self._show(screen),
            Finished("issuance", result.outcome.value, result.phase, reason),
        ]

    # -- phase 4: log in at a relying party ----------------------------------------------

    def start_login(self, service: str, challenge_id: str, nonce: bytes) -> list[Action]:
        self.login = Login(service, challenge_id, nonce)
        return [self._show(login_screen(service))]

    def _on_login_pin(self, values: Mapping[str, Any]) -> list[Action]:
        login = self.login
        if login is None:
            raise UnexpectedInput("no login in progress")
        pin = self._secret(values.get("pin", ""), SecretKind.AUTH_PIN)
        try:
            if self.se is None:
                raise CardError(StatusWord.CONDITIONS_NOT_SATISFIED, "no secure element")
            _run_ok(self.se, jp.select_ap(), "SELECT AP")
            sw = verify_pin(self.se, jp.EF.AUTH_PIN, pin)
            self._wipe(pin)
            tries = jp.tries_from_sw(sw)
            if tries is not None and tries > 0:
                return [self._show(login_screen(login.service, f"Wrong PIN: {tries} tries left."))]
            if sw != StatusWord.OK:
                raise CardError(sw, "VERIFY")
            # On the phone EF 000A is readable only after the auth PIN (DOMAIN.md §1).
            certificate = read_file(self.se, jp.EF.AUTH_CERT)
            signature = sign_sha256(self.se, jp.EF.AUTH_KEY, login.nonce)
            _exchange(self.se, jp.select_ap())
        except CardError as exc:
            self._wipe(pin)
            self.login = None
            return [Finished("login", "failed", self.storage.phase, f"sw_{exc.sw:04X}")]
        self.login = None
        return [
            LoginSigned(login.challenge_id, login.nonce, certificate, signature),
            Finished("login", "signed", self.storage.phase),
        ]


# ---------------------------------------------------------------------------------------
# The scripted virtual user


@dataclass(frozen=True, slots=True)
class UserScript:
    """What a simulated person chooses and types. Their secrets never leave this object
    except by being typed into the app."""

    card_password: str = field(repr=False)  # the My Number Card's signing password
    auth_pin: str = field(repr=False)  # the phone PIN they will choose
    signing_password: str = field(repr=False)  # the phone signing password they will choose
    certificates: str = "both"  # "both" | "auth" | "sign"
    pin_option: om.PinOption = om.DEFAULT_PIN_OPTION
    typos: frozenset[ScreenId] = frozenset()  # screens where the user gets it wrong once


def _mistyped(value: str) -> str:
    """Same format, one character off: what a slip of the finger looks like."""
    last = value[-1]
    return value[:-1] + ("1" if last == "0" else "0")


class VirtualUser:
    """Answers the app's screens as the script says; counts the actions it takes."""

    def __init__(self, script: UserScript, card: ApduChannel | None) -> None:
        self.script = script
        self.card = card
        self.actions = 0
        self.screens_answered: list[ScreenId] = []
        self._slipped: set[ScreenId] = set()
        self._code = b""  # options 1 and 6: the code the app handed over, typed back once

    def _slip(self, screen: ScreenId) -> bool:
        if screen in self.script.typos and screen not in self._slipped:
            self._slipped.add(screen)
            return True
        return False

    def answer(self, screen: Screen) -> dict[str, Any]:
        self.screens_answered.append(screen.id)
        self.actions += len(screen.inputs)
        script = self.script
        if screen.id is ScreenId.WELCOME:
            return {"certificates": script.certificates, "pin_option": script.pin_option}
        if screen.id is ScreenId.CARD_PASSWORD:
            password = script.card_password
            return {"card_password": _mistyped(password) if self._slip(screen.id) else password}
        if screen.id is ScreenId.TAP_CARD:
            return {"card": self.card}
        if screen.id in (ScreenId.SET_AUTH_PIN, ScreenId.SET_SIGNING_PASSWORD):
            pin = script.auth_pin if screen.id is ScreenId.SET_AUTH_PIN else script.signing_password
            return {"pin": pin, "confirm": _mistyped(pin) if self._slip(screen.id) else pin}
        if screen.id is ScreenId.DELIVERED_CODE and screen.shown is not None:
            self._code = screen.shown.reveal()
            return {"ok": True}
        if screen.id is ScreenId.ENTER_CODE:
            code = self._code.decode("ascii")
            return {"code": _mistyped(code) if self._slip(screen.id) else code}
        if screen.id is ScreenId.LOGIN_PIN:
            return {"pin": _mistyped(script.auth_pin) if self._slip(screen.id) else script.auth_pin}
        return {}


# ---------------------------------------------------------------------------------------
# The async shell


class PhoneLink(Protocol):
    """The phone's connection to the back end (MQTT, or in-process)."""

    async def send(self, message: Message) -> None: ...


class PhoneApp:
    """Runs an ``AppCore``: feeds it messages from the link and the user's answers, and
    carries out what it asks. A new ``PhoneApp`` over the same SE is a reinstall."""

    def __init__(self, core: AppCore, user: VirtualUser, link: PhoneLink) -> None:
        self.core = core
        self.user = user
        self.link = link
        self.finished: dict[str, asyncio.Future[Finished]] = {}
        self.login_answer: LoginSigned | None = None
        self._lock = asyncio.Lock()  # one event at a time, as a phone's UI thread

    def _future(self, what: str) -> asyncio.Future[Finished]:
        future = self.finished.get(what)
        if future is None or future.done():
            future = self.finished[what] = asyncio.get_running_loop().create_future()
        return future

    async def deliver(self, message: Message) -> None:
        """A message from the back end arrived on the down link."""
        async with self._lock:
            await self._carry_out(self.core.receive(message), message.envelope.device_id)

    async def _carry_out(self, actions: list[Action], device_id: str | None = None) -> None:
        pending = list(actions)
        while pending:
            action = pending.pop(0)
            if isinstance(action, Send):
                await self.link.send(
                    build(
                        action.body,
                        saga_id=action.saga_id,
                        causation_id=action.causation_id,
                        device_id=self.core.device.device_id,
                    )
                )
            elif isinstance(action, Show):
                if action.screen.inputs:
                    values = self.user.answer(action.screen)
                    pending[:0] = self.core.answer(action.screen.id, values)
            elif isinstance(action, LoginSigned):
                self.login_answer = action
            elif isinstance(action, Finished):
                future = self._future(action.what)
                if not future.done():
                    future.set_result(action)

    async def apply(self) -> Finished:
        """Phase 1 onward: the user opens the app and applies; returns how it ended."""
        future = self._future("issuance")
        async with self._lock:
            await self._carry_out(self.core.start_issuance())
        return await future

    async def log_in(self, service: str, challenge_id: str, nonce: bytes) -> LoginSigned | None:
        future = self._future("login")
        self.login_answer = None
        async with self._lock:
            await self._carry_out(self.core.start_login(service, challenge_id, nonce))
        await future
        return self.login_answer
