"""The app's life-cycle screens (FLOWS.md §4): PIN change, PIN reset, disposal, the found
phone's renewal and the clean-up a reconnecting phone may get.

``LifecycleCore`` is ``AppCore`` plus these flows, with the same shape (events in, actions
out, no I/O). Where a life-cycle flow repeats a piece of issuance — the card signature, the
TSM's temporary PINs, local PIN setting, ``app.cmd.result`` — the core opens an
``Issuance`` for that saga and the issuance code runs it unchanged. ``LifecycleUser``
answers the new screens and keeps the person's current PINs as they change.

Secrets as in ``device_sim/app.py``: typed into ``Secret`` holders, wiped after use,
never in a message. What the back end learns of a PIN change is which PIN, not what.
"""

# ruff: noqa: S105 - screen and field names below are not passwords

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from device_sim.app import (
    AUTH_PIN_RULE,
    NEW_PIN_KIND,
    PIN_EF_OF,
    PIN_RULE_OF,
    SIGNING_PASSWORD_RULE,
    Action,
    AppCore,
    Finished,
    Input,
    InputKind,
    Issuance,
    PhoneApp,
    Screen,
    ScreenId,
    Send,
    Show,
    Step,
    VirtualUser,
    _exchange,
    _mistyped,
    _run_ok,
    progress_screen,
    read_file,
    verify_pin,
)
from orchestrator import lifecycle_messages as lm
from orchestrator import messages as om
from protocol import jpki as jp
from protocol.envelope import Message
from protocol.errors import CardError, JpkiError, StatusWord

log = structlog.get_logger(__name__)

KEY_EF_OF = {om.CertificateKind.AUTH: jp.EF.AUTH_KEY, om.CertificateKind.SIGN: jp.EF.SIGN_KEY}
CERT_EF_OF = {om.CertificateKind.AUTH: jp.EF.AUTH_CERT, om.CertificateKind.SIGN: jp.EF.SIGN_CERT}


class LifecycleScreen(enum.StrEnum):
    MENU = "menu"  # phase 4: what the user can do with the certificates on this phone
    CHANGE_PIN = "change_pin"  # old PIN, new PIN, new PIN again
    RESET_PIN = "reset_pin"  # "you will need your My Number Card": go on?
    DISPOSE = "dispose"  # "revoke both certificates and remove them from this phone?"
    DISPOSE_PASSWORD = "dispose_password"  # the phone's signing password to confirm
    RENEW_SIGNING = "renew_signing"  # found phone: renew the signing certificate now?
    DONE = "lifecycle_done"  # how the flow ended


def change_pin_screen(kind: om.CertificateKind, notice: str = "") -> Screen:
    rule = AUTH_PIN_RULE if kind is om.CertificateKind.AUTH else SIGNING_PASSWORD_RULE
    name = "PIN" if kind is om.CertificateKind.AUTH else "signing password"
    return Screen(
        LifecycleScreen.CHANGE_PIN,  # type: ignore[arg-type]
        4, f"Change your {name}", f"Type your current {name}, then the new one twice.",
        (Input("old", InputKind.SECRET, f"Current {name}", rule=rule),
         Input("pin", InputKind.SECRET, f"New {name}", rule=rule),
         Input("confirm", InputKind.SECRET, f"New {name} again", rule=rule)),
        notice,
    )


def reset_pin_screen() -> Screen:
    return Screen(
        LifecycleScreen.RESET_PIN,  # type: ignore[arg-type]
        4, "Forgot your PIN?",
        "You will need your My Number Card and its signing password. Your certificates stay.",
        (Input("ok", InputKind.ACKNOWLEDGE, "Continue"),),
    )


def dispose_screen() -> Screen:
    return Screen(
        LifecycleScreen.DISPOSE,  # type: ignore[arg-type]
        4, "Remove the certificates",
        "Both certificates on this phone will be revoked and removed. This cannot be undone.",
        (Input("confirm", InputKind.CHOICE, "Remove them?", ("yes", "no")),),
    )


def dispose_password_screen(kind: om.CertificateKind, notice: str = "") -> Screen:
    name = "signing password" if kind is om.CertificateKind.SIGN else "PIN"
    return Screen(
        LifecycleScreen.DISPOSE_PASSWORD,  # type: ignore[arg-type]
        4, "Confirm", f"Type this phone's {name} to confirm.",
        (Input("pin", InputKind.SECRET, f"Phone {name}"),), notice,
    )


def renew_signing_screen() -> Screen:
    return Screen(
        LifecycleScreen.RENEW_SIGNING,  # type: ignore[arg-type]
        4, "Welcome back",
        "Your phone was found. Its signing certificate was revoked for safety: renew it now "
        "with your My Number Card. The user-authentication certificate works again.",
        (Input("ok", InputKind.ACKNOWLEDGE, "Renew"),),
    )


def done_screen(result: lm.LifecycleResult) -> Screen:
    if result.outcome is lm.LifecycleOutcome.DONE:
        text = {
            lm.LifecycleFlow.DISPOSAL: "Both certificates are revoked and removed from this phone.",
            lm.LifecycleFlow.ONLINE: "The certificates on this phone were revoked: they are "
                                     "removed. Apply again to use Smartphone JPKI here.",
            lm.LifecycleFlow.PIN_CHANGE: "Your PIN is changed.",
        }.get(result.flow, "Done.")
    else:
        text = f"Not completed ({(result.reason or lm.LifecycleReason.INTERNAL).value})."
    return Screen(LifecycleScreen.DONE, 1 if result.applet_deleted else 4,  # type: ignore[arg-type]
                  "Smartphone JPKI", text, (Input("ok", InputKind.ACKNOWLEDGE, "OK"),))


@dataclass(slots=True)
class Disposal:
    saga_id: str
    kind: om.CertificateKind
    challenge: lm.DisposalChallenge | None = None


@dataclass(slots=True)
class PinChange:
    kind: om.CertificateKind


class LifecycleCore(AppCore):
    """``AppCore`` plus the life-cycle flows."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pin_change: PinChange | None = None
        self.disposal: Disposal | None = None
        self._renewal: tuple[str, lm.ReissuePrompt] | None = None

    # -- entry points (the user opens a menu item, the link connects) ----------------------

    def connected(self) -> list[Action]:
        """An idle app tells the back end it is online (``online.py`` may clean a stale
        applet). Mid-flow it does not: the running saga owns the SE."""
        busy = self.issuance is not None and self.issuance.step is not Step.DONE
        if busy or self.se_identity is None or self.disposal is not None:
            return []
        online = om.Online(device_id=self.device.device_id,
                           app_instance_id=self.storage.app_instance_id, se=self.se_identity)
        return [Send(online, saga_id=self._new_id())]

    def start_pin_change(self, kind: om.CertificateKind) -> list[Action]:
        self.pin_change = PinChange(kind)
        return [self._show(change_pin_screen(kind))]

    def start_pin_reset(self, kinds: list[om.CertificateKind]) -> list[Action]:
        self.issuance = Issuance(application_id=self._new_id(), certificates=tuple(sorted(kinds)),
                                 pin_option=om.PinOption.APP_TYPES_TEMPORARY, step=Step.CHOOSING)
        return [self._show(reset_pin_screen())]

    def start_disposal(self) -> list[Action]:
        kind = (om.CertificateKind.SIGN if "sign" in self.storage.certificates
                else om.CertificateKind.AUTH)
        self.disposal = Disposal(saga_id=self._new_id(), kind=kind)
        return [self._show(dispose_screen())]

    # -- answers ---------------------------------------------------------------------------

    def answer(self, screen_id: Any, values: Mapping[str, Any]) -> list[Action]:
        handler = {
            LifecycleScreen.CHANGE_PIN: self._on_change_pin,
            LifecycleScreen.RESET_PIN: self._on_reset_pin,
            LifecycleScreen.DISPOSE: self._on_dispose,
            LifecycleScreen.DISPOSE_PASSWORD: self._on_dispose_password,
            LifecycleScreen.RENEW_SIGNING: self._on_renew,
            LifecycleScreen.DONE: lambda _values: [],
        }.get(screen_id)
        if handler is None:
            return super().answer(screen_id, values)
        return handler(values)

    def _on_change_pin(self, values: Mapping[str, Any]) -> list[Action]:
        change = self.pin_change
        if change is None:
            return []
        kind = change.kind
        old = self._secret(values.get("old", ""), NEW_PIN_KIND[kind])
        new = self._secret(values.get("pin", ""), NEW_PIN_KIND[kind])
        confirm = self._secret(values.get("confirm", ""), NEW_PIN_KIND[kind])
        rule = PIN_RULE_OF[kind]
        notice = ""
        if not rule.accepts(new.reveal()):
            notice = f"The {rule.name} must be {rule.min_length}-{rule.max_length} characters."
        elif not new.matches(confirm):
            notice = "The two entries differ. Please type them again."
        self._wipe(confirm)
        if notice:
            self._wipe(old)
            self._wipe(new)
            return [self._show(change_pin_screen(kind, notice))]
        try:
            if self.se is None:
                raise CardError(StatusWord.CONDITIONS_NOT_SATISFIED, "no secure element")
            _run_ok(self.se, jp.select_ap(), "SELECT AP")
            sw = verify_pin(self.se, PIN_EF_OF[kind], old)
            if sw == StatusWord.OK:
                sw = _exchange(self.se, jp.change_reference_data(new.reveal())).sw
            _exchange(self.se, jp.select_ap())  # logout
        except CardError as exc:
            sw = exc.sw
        self._wipe(old)
        self._wipe(new)
        tries = jp.tries_from_sw(sw)
        if tries:
            return [self._show(change_pin_screen(kind, f"Wrong current PIN: {tries} tries left."))]
        self.pin_change = None
        if sw != StatusWord.OK:
            result = lm.LifecycleResult(flow=lm.LifecycleFlow.PIN_CHANGE,
                                        outcome=lm.LifecycleOutcome.FAILED,
                                        reason=lm.LifecycleReason.SE_ERROR)
            return [self._show(done_screen(result)),
                    Finished("pin_change", "failed", self.storage.phase, f"sw_{sw:04X}")]
        report = lm.PinChanged(device_id=self.device.device_id, se=self._se(), kind=kind,
                               changed_at=datetime.now(UTC))
        result = lm.LifecycleResult(flow=lm.LifecycleFlow.PIN_CHANGE,
                                    outcome=lm.LifecycleOutcome.DONE)
        return [Send(report, saga_id=self._new_id()), self._show(done_screen(result)),
                Finished("pin_change", "done", self.storage.phase)]

    def _se(self) -> om.SeIdentity:
        if self.se_identity is None:
            raise CardError(StatusWord.CONDITIONS_NOT_SATISFIED, "no secure element")
        return self.se_identity

    def _on_reset_pin(self, values: Mapping[str, Any]) -> list[Action]:
        issuance = self._expect(Step.CHOOSING)
        issuance.step = Step.ENROLLED  # from here the issuance code runs steps 5, 11, 12
        request = lm.PinResetRequest(device_id=self.device.device_id,
                                     app_instance_id=self.storage.app_instance_id,
                                     se=self._se(), certificates=list(issuance.certificates))
        return [Send(request, saga_id=issuance.application_id),
                self._show(progress_screen(ScreenId.PREPARING, 4, "Preparing the reset."))]

    def _on_dispose(self, values: Mapping[str, Any]) -> list[Action]:
        disposal = self.disposal
        if disposal is None:
            return []
        if values.get("confirm") != "yes":
            self.disposal = None
            return [Finished("disposal", "cancelled", self.storage.phase)]
        request = lm.DisposalRequest(device_id=self.device.device_id,
                                     app_instance_id=self.storage.app_instance_id, se=self._se())
        return [Send(request, saga_id=disposal.saga_id),
                self._show(progress_screen(ScreenId.PREPARING, 4, "Contacting the service."))]

    def _on_dispose_password(self, values: Mapping[str, Any]) -> list[Action]:
        disposal = self.disposal
        if disposal is None or disposal.challenge is None or self.se is None:
            return []
        kind = disposal.kind
        pin = self._secret(values.get("pin", ""), NEW_PIN_KIND[kind])
        try:
            _run_ok(self.se, jp.select_ap(), "SELECT AP")
            sw = verify_pin(self.se, PIN_EF_OF[kind], pin)
            self._wipe(pin)
            tries = jp.tries_from_sw(sw)
            if tries:
                return [self._show(dispose_password_screen(kind, f"Wrong: {tries} tries left."))]
            if sw != StatusWord.OK:
                raise CardError(sw, "VERIFY")
            certificate = read_file(self.se, CERT_EF_OF[kind])
            _run_ok(self.se, jp.select_ef(KEY_EF_OF[kind]), "SELECT EF")
            digest = jp.digest_info(
                "sha256", hashlib.sha256(disposal.challenge.to_be_signed()).digest())
            signature = _run_ok(self.se, jp.compute_digital_signature(digest),
                                "COMPUTE DIGITAL SIGNATURE")
            _exchange(self.se, jp.select_ap())
        except JpkiError as exc:
            self._wipe(pin)
            log.info("disposal_confirmation_failed", device_id=self.device.device_id,
                     error=type(exc).__name__)
            self.disposal = None
            return [Finished("disposal", "failed", self.storage.phase, "se_error")]
        confirmed = lm.DisposalConfirmed(kind=kind, signature=signature, certificate=certificate)
        return [Send(confirmed, saga_id=disposal.saga_id),
                self._show(progress_screen(ScreenId.PREPARING, 4, "Removing the certificates."))]

    def _on_renew(self, values: Mapping[str, Any]) -> list[Action]:
        if self._renewal is None:
            return []
        saga_id, prompt = self._renewal
        self._renewal = None
        self.issuance = Issuance(application_id=saga_id, certificates=tuple(prompt.certificates),
                                 pin_option=prompt.pin_option, step=Step.ENROLLED)
        accepted = lm.ReissueAccepted(certificates=prompt.certificates,
                                      app_instance_id=self.storage.app_instance_id)
        return [Send(accepted, saga_id=saga_id),
                self._show(progress_screen(ScreenId.PREPARING, 4, "Renewing."))]

    # -- messages --------------------------------------------------------------------------

    def receive(self, message: Message) -> list[Action]:
        body = message.body
        saga_id = message.envelope.saga_id
        if isinstance(body, lm.DisposalChallenge):
            disposal = self.disposal
            if disposal is None or saga_id != disposal.saga_id or disposal.challenge is not None:
                return []
            disposal.challenge = body
            return [self._show(dispose_password_screen(disposal.kind))]
        if isinstance(body, lm.ReissuePrompt):
            if self._renewal is not None or (self.issuance and self.issuance.step is not Step.DONE):
                return []
            self._renewal = (saga_id or "", body)
            return [self._show(renew_signing_screen())]
        if isinstance(body, lm.LifecycleResult):
            return self._on_lifecycle_result(message, body)
        return super().receive(message)

    def _on_lifecycle_result(self, message: Message, result: lm.LifecycleResult) -> list[Action]:
        disposal = self.disposal
        if result.flow is lm.LifecycleFlow.DISPOSAL:
            if disposal is None or message.envelope.saga_id != disposal.saga_id:
                return []
            self.disposal = None
        if result.applet_deleted:
            self.storage.phase = 1
            self.storage.certificates = []
        reason = result.reason.value if result.reason else None
        return [self._show(done_screen(result)),
                Finished(result.flow.value, result.outcome.value, self.storage.phase, reason)]


class LifecycleUser(VirtualUser):
    """A ``VirtualUser`` who also changes and resets PINs and disposes: keeps the person's
    current phone PINs (``pins``) and the ones they will choose next (``next_pins``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pins: dict[om.CertificateKind, str] = {
            om.CertificateKind.AUTH: self.script.auth_pin,
            om.CertificateKind.SIGN: self.script.signing_password,
        }
        self.next_pins: dict[om.CertificateKind, str] = {}
        self.dispose = "yes"

    def __repr__(self) -> str:
        return f"LifecycleUser(actions={self.actions}, PINs redacted)"

    def _choose(self, kind: om.CertificateKind) -> str:
        """The PIN being set now; once typed on a set screen it is the current one."""
        chosen = self.next_pins.pop(kind, None) or self.pins[kind]
        self.pins[kind] = chosen
        return chosen

    def answer(self, screen: Screen) -> dict[str, Any]:
        screen_id = screen.id
        if screen_id in (ScreenId.SET_AUTH_PIN, ScreenId.SET_SIGNING_PASSWORD):
            self.screens_answered.append(screen_id)
            self.actions += len(screen.inputs)
            kind = (om.CertificateKind.AUTH if screen_id is ScreenId.SET_AUTH_PIN
                    else om.CertificateKind.SIGN)
            pin = self._choose(kind)
            return {"pin": pin, "confirm": pin}
        if screen_id is ScreenId.LOGIN_PIN:
            self.screens_answered.append(screen_id)
            self.actions += len(screen.inputs)
            return {"pin": self.pins[om.CertificateKind.AUTH]}
        if screen_id not in set(LifecycleScreen):
            return super().answer(screen)
        self.screens_answered.append(screen_id)  # type: ignore[arg-type]
        self.actions += len(screen.inputs)
        if screen_id == LifecycleScreen.CHANGE_PIN:
            kind = (om.CertificateKind.AUTH if "PIN" in screen.title.split()[-1]
                    else om.CertificateKind.SIGN)
            old = self.pins[kind]
            new = self._choose(kind)
            return {"old": old, "pin": new, "confirm": new}
        if screen_id == LifecycleScreen.DISPOSE:
            return {"confirm": self.dispose}
        if screen_id == LifecycleScreen.DISPOSE_PASSWORD:
            kind = (om.CertificateKind.SIGN if "signing" in screen.text
                    else om.CertificateKind.AUTH)
            pin = self.pins[kind]
            return {"pin": _mistyped(pin) if self._slip(screen_id) else pin}
        return {"ok": True}


class LifecycleApp(PhoneApp):
    """``PhoneApp`` with the life-cycle entry points; its core is a ``LifecycleCore``."""

    core: LifecycleCore

    async def connected(self) -> None:
        async with self._lock:
            await self._carry_out(self.core.connected())

    async def _run(self, what: str, actions: list[Action]) -> Finished:
        future = self._future(what)
        async with self._lock:
            await self._carry_out(actions)
        return await future

    async def change_pin(self, kind: om.CertificateKind) -> Finished:
        return await self._run("pin_change", self.core.start_pin_change(kind))

    async def reset_pin(self, kinds: list[om.CertificateKind]) -> Finished:
        return await self._run("issuance", self.core.start_pin_reset(kinds))

    async def dispose(self) -> Finished:
        return await self._run("disposal", self.core.start_disposal())

    def expect(self, what: str) -> Any:
        """A future for a flow the back end starts (``issuance`` for a found phone's renewal,
        ``online`` for a clean-up on reconnection)."""
        return self._future(what)


__all__ = ["LifecycleApp", "LifecycleCore", "LifecycleScreen", "LifecycleUser", "Show"]
