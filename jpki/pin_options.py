"""``jpki pin-options report``: the seed's PIN-setting comparison, measured on real runs.

Every option of ``orchestrator/flows/pin_options.py`` runs through the real issuance saga on
the embedded default (orchestrator, SP-TSM and CA workers, phones with their SEs and cards;
``jpki.run.run_stack``). While they run, three observers record what happened:

- **on each phone's SE** (``ObservedSe``): the SP-TSM's PIN commands (their headers stay in
  clear under SCP03, GP Amd D §6.2.5), the app's VERIFY / CHANGE REFERENCE DATA / RESET
  RETRY COUNTER and their status words, and the PIN states. Right after the script that set
  the temporary PIN, and again right after the release script, an **attacker who learnt
  the temporary PIN** tries VERIFY + COMPUTE DIGITAL SIGNATURE on the real SE; a signature
  counts only if it verifies under the applet's public key;
- **on the bus** (``MessageTally``): every message of each phone's saga, and the SP-TSM's
  round trips to the phone from its replies;
- **in the app** (``AppCore.secret_holds``, the virtual user's actions and screens): extra
  user actions, how long the user's real PIN sat in app memory, mistyped codes. The first
  phone of each option (with ``--phones`` ≥ 2) slips once when typing a code.

From those measurements the documented rules below (``derive_marks``) give the seed's
columns — pros/cons, security, convenience, cost — in the seed's symbols, printed beside the
seed's own ratings (``docs/pin-options.md``). The invariant checker of ``jpki audit`` runs
over the stores afterwards; a broken invariant makes the command exit 1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from rich.console import Console
from rich.table import Table

from device_sim.app import ScreenId, SecretKind
from device_sim.fleet import Fleet, Phone
from device_sim.se.element import ScriptCommand, ScriptOutcome, SecureElement
from infra.logging import configure_logging
from infra.transport.base import Outgoing, Transport
from jpki.run import EMBEDDED, RunSettings, run_stack
from orchestrator.flows.pin_options import STRATEGIES
from orchestrator.messages import CertificateKind, PinOption
from protocol import jpki
from protocol.apdu import CommandAPDU, ResponseAPDU
from protocol.envelope import InvalidMessage, decode
from protocol.errors import StatusWord

# The seed's table (seed README, "Reference: PIN-setting options studied in FY2016").
SEED_MARKS: dict[PinOption, tuple[str, str, str]] = {  # security, convenience, cost
    PinOption.USER_TYPES_TEMPORARY: ("×", "×", "○"),
    PinOption.APP_TYPES_TEMPORARY: ("△", "○", "○"),
    PinOption.BLOCKED_UNTIL_RELEASED: ("◎", "○", "△"),
    PinOption.INITIAL_STATE: ("◎", "○", "△"),
    PinOption.REAL_PIN_AT_APPLICATION: ("×", "○", "○"),
    PinOption.PUK: ("○", "×", "○"),
}
SEED_PROS_CONS: dict[PinOption, str] = {
    PinOption.USER_TYPES_TEMPORARY: "✗ extra user step; ✗ usable while in temp-PIN state; "
    "✗ user can mistype the temp PIN",
    PinOption.APP_TYPES_TEMPORARY: "○ no user step; △ usable while in temp-PIN state; "
    "○ no mistyping",
    PinOption.BLOCKED_UNTIL_RELEASED: "○ no user step; ○ unusable in temp-PIN state (blocked); "
    "○ no mistyping; △ SP-TSM needs a new function",
    PinOption.INITIAL_STATE: "○ no user step; ○ unusable until the real PIN is set; "
    "○ no mistyping; △ SP-TSM needs a new function; △ applet needs a new function",
    PinOption.REAL_PIN_AT_APPLICATION: "○ no user step; ○ temp-PIN window very short; "
    "○ no mistyping; ○ light on SP-TSM; ✗ the real PIN is held on the phone while the "
    "applet is issued",
    PinOption.PUK: "✗ extra user step (PUK); ○ unusable in temp-PIN state (blocked); "
    "○ no mistyping; ○ light on SP-TSM; △ PUK must be delivered; △ user must keep the PUK safe",
}

# The option every other is compared with: the seed's normal sequence, no user step.
REFERENCE = PinOption.APP_TYPES_TEMPORARY
# The user's real PIN "sits in the app during issuance" when it is held longer than this
# share of the whole issuance (typing it and putting it on the SE takes one UI event).
HOLD_SHARE_DURING_ISSUANCE = 0.10

INS_NAMES = {
    jpki.INS_SET_TEMPORARY_PIN: "SET TEMPORARY PIN",
    jpki.INS_BLOCK_PIN: "BLOCK PIN",
    jpki.INS_UNBLOCK_PIN: "UNBLOCK PIN",
    jpki.INS_TRANSITION_PIN: "TRANSITION PIN",
    jpki.INS_GET_PIN_STATUS: "GET PIN STATUS",
}
APP_INS_NAMES = {
    jpki.INS_VERIFY: "VERIFY",
    jpki.INS_CHANGE_REFERENCE_DATA: "CHANGE REFERENCE DATA",
    jpki.INS_RESET_RETRY_COUNTER: "RESET RETRY COUNTER",
}
# PIN states an ISO 7816-4 PIN has anyway (set, blocked, counter run down; a PUK-protected
# PIN waiting for RESET RETRY COUNTER is ISO's blocked PIN with its resetting code). A state
# outside these is an applet function made for one PIN-setting option.
ISO_PIN_STATES = frozenset({
    jpki.PinState.NOT_SET, jpki.PinState.TEMPORARY, jpki.PinState.TEMPORARY_BLOCKED,
    jpki.PinState.PUK_LOCKED, jpki.PinState.SET, jpki.PinState.SET_BLOCKED,
    jpki.PinState.EXHAUSTED,
})
# SP-TSM commands that change a PIN's state after the temporary PIN was set (step 11).
STATE_CHANGING_RELEASE = frozenset({jpki.INS_UNBLOCK_PIN, jpki.INS_TRANSITION_PIN})
PIN_EF = {CertificateKind.AUTH: jpki.EF.AUTH_PIN, CertificateKind.SIGN: jpki.EF.SIGN_PIN}
KEY_EF = {CertificateKind.AUTH: jpki.EF.AUTH_KEY, CertificateKind.SIGN: jpki.EF.SIGN_KEY}


# ---------------------------------------------------------------------------------------
# Observers


@dataclass(slots=True)
class AttackProbe:
    """An attacker who learnt the temporary PIN, at one moment, against one PIN."""

    moment: str  # "temporary_pin_set" | "released"
    kind: str
    state: str  # the PIN's state at that moment
    verify_sw: str
    sign_sw: str
    signature_valid: bool
    at_s: float  # since the phone's first SE command


@dataclass(slots=True)
class SeObservation:
    tsm_pin_commands: list[str] = field(default_factory=list)  # "SET TEMPORARY PIN 03", …
    app_pin_commands: list[tuple[str, str]] = field(default_factory=list)  # (command, SW)
    states: set[str] = field(default_factory=set)
    probes: list[AttackProbe] = field(default_factory=list)
    pin_set_at_s: dict[str, float] = field(default_factory=dict)  # kind → when SET


class ObservedSe:
    """The phone's real SE, with a recorder and an attacker standing next to it."""

    def __init__(self, se: SecureElement) -> None:
        self._se = se
        self.seen = SeObservation()
        self._started: float | None = None
        self._current_pin: int | None = None

    def __getattr__(self, name: str) -> Any:  # identity, manager, save, … of the real SE
        return getattr(self._se, name)

    def _now(self) -> float:
        now = time.monotonic()
        if self._started is None:
            self._started = now
        return now - self._started

    def _applet(self) -> Any:
        return next(
            (a.applet for a in self._se.manager.applications.values() if a.aid == jpki.AID),
            None,
        )

    def transmit(self, apdu: bytes) -> bytes:
        """The app's own APDUs (local PIN setting, logins)."""
        self._now()
        response = self._se.transmit(apdu)
        command = CommandAPDU.from_bytes(apdu)
        sw = int.from_bytes(response[-2:], "big")
        if command.ins == jpki.INS_SELECT and command.p1 == 0x02:
            self._current_pin = int.from_bytes(command.data, "big")
        name = APP_INS_NAMES.get(command.ins)
        # Only the local PIN setting: the phase-4 login's VERIFY afterwards is not part of it.
        setting = len(self.seen.pin_set_at_s) < len(PIN_EF)
        if name is not None and command.data and setting:
            self.seen.app_pin_commands.append((name, f"{sw:04X}"))
            kind = next((k for k, ef in PIN_EF.items() if ef == self._current_pin), None)
            if (
                kind is not None and sw == StatusWord.OK
                and command.ins != jpki.INS_VERIFY and kind.value not in self.seen.pin_set_at_s
            ):
                self.seen.pin_set_at_s[kind.value] = self._now()
        self._note_states()
        return response

    def run_script(self, script: Iterable[ScriptCommand]) -> ScriptOutcome:
        """An SP-TSM script relayed by the app; the attacker acts right after it."""
        steps = list(script)
        self._now()
        outcome = self._se.run_script(steps)
        inss: set[int] = set()
        for step in steps[: len(outcome.responses)]:
            head = step.apdu[:4]
            if len(head) == 4 and head[0] & 0x80 and head[1] in INS_NAMES:
                inss.add(head[1])
                suffix = f" {head[2]:02X}" if head[1] == jpki.INS_SET_TEMPORARY_PIN else ""
                self.seen.tsm_pin_commands.append(INS_NAMES[head[1]] + suffix)
        self._note_states()
        if outcome.completed and jpki.INS_SET_TEMPORARY_PIN in inss:
            self._attack("temporary_pin_set")
        elif outcome.completed and jpki.INS_GET_PIN_STATUS in inss:
            self._attack("released")
        return outcome

    def _note_states(self) -> None:
        applet = self._applet()
        if applet is not None:
            for ef in PIN_EF.values():
                self.seen.states.add(applet.pin_status(ef).state.name)

    def _attack(self, moment: str) -> None:
        applet = self._applet()
        if applet is None:
            return
        pins = applet.to_state()["pins"]
        for kind, pin_ef in PIN_EF.items():
            status = applet.pin_status(pin_ef)
            public_key = applet.public_key(KEY_EF[kind])
            if status.state is jpki.PinState.NOT_SET or public_key is None:
                continue
            # The premise of the question: the attacker knows the temporary PIN.
            learnt = bytes.fromhex(pins[f"{pin_ef:04X}"]["value"])
            message = f"attacker {moment} {kind.value}".encode()
            digest_info = jpki.digest_info("sha256", hashlib.sha256(message).digest())
            self._sw(jpki.select_ap())
            self._sw(jpki.select_ef(pin_ef))
            verify_sw = self._sw(jpki.verify(learnt)).sw
            self._sw(jpki.select_ef(KEY_EF[kind]))
            signed = self._sw(jpki.compute_digital_signature(digest_info))
            self._sw(jpki.select_ap())  # the attacker leaves nothing verified behind
            valid = False
            if signed.sw == StatusWord.OK:
                try:
                    public_key.verify(signed.data, message, padding.PKCS1v15(), hashes.SHA256())
                    valid = True
                except InvalidSignature:
                    valid = False
            self.seen.probes.append(AttackProbe(
                moment, kind.value, status.state.name, f"{verify_sw:04X}", f"{signed.sw:04X}",
                valid, round(self._now(), 6),
            ))

    def _sw(self, command: CommandAPDU) -> ResponseAPDU:
        return ResponseAPDU.from_bytes(self._se.transmit(command.to_bytes()))


@dataclass(slots=True)
class Seen:
    type: str
    saga_id: str | None
    device_id: str | None
    round_trips: int


class MessageTally:
    """Every message published on the bus, by type, saga and device."""

    def __init__(self) -> None:
        self.messages: list[Seen] = []

    async def attach(self, transport: Transport) -> None:
        publish = transport.publish

        async def counting(messages: Sequence[Outgoing]) -> None:
            for outgoing in messages:
                self._note(outgoing.body)
            await publish(messages)

        transport.publish = counting  # type: ignore[method-assign]

    def _note(self, raw: bytes) -> None:
        try:
            message = decode(raw)
        except InvalidMessage:
            return
        envelope = message.envelope
        round_trips = getattr(message.body, "round_trips", 0) if envelope.type.startswith(
            "tsm.reply."
        ) else 0
        self.messages.append(
            Seen(envelope.type, envelope.saga_id, envelope.device_id, int(round_trips or 0))
        )

    def of(self, saga_id: str, device_id: str) -> list[Seen]:
        return [
            m for m in self.messages
            if m.saga_id == saga_id or (m.saga_id is None and m.device_id == device_id)
        ]


# ---------------------------------------------------------------------------------------
# Per-phone and per-option measurements


@dataclass(slots=True)
class PhoneMeasurement:
    device_id: str
    option: int
    slips: bool  # this user slips once when typing a code
    outcome: str
    user_actions: int
    screens: list[str]
    code_screens: int  # screens where the user was handed or typed a code
    real_pin_hold_s: float
    issuance_s: float
    temporary_window_s: float | None  # temporary PIN set → the user's PIN set
    signable_window_s: float | None  # first successful attack → the user's PIN set
    probes: list[AttackProbe]
    tsm_pin_commands: list[str]
    app_pin_commands: list[tuple[str, str]]
    states: list[str]
    messages: int
    round_trips: int


@dataclass(slots=True)
class OptionMeasurement:
    option: int
    title: str
    phones: int
    issued: int
    user_actions: float
    extra_user_actions: float
    code_typed_by_user: bool
    attack_in_temporary_state: bool
    attack_before_pin_change: bool
    attack_detail: list[str]
    temporary_window_s: float  # temporary PIN set → the user's PIN set
    signable_window_s: float  # first successful attack → the user's PIN set
    mistype_possible: bool
    mistype_cost: str
    real_pin_hold_s: float
    real_pin_hold_share: float
    tsm_functions: list[str]
    applet_functions: list[str]
    new_tsm_function: bool
    new_applet_function: bool
    messages: float
    messages_added: float
    round_trips: float
    round_trips_added: float
    pros_cons: str = ""
    security: str = ""
    convenience: str = ""
    cost: str = ""
    seed_security: str = ""
    seed_convenience: str = ""
    seed_cost: str = ""
    seed_pros_cons: str = ""
    agreement: str = ""


REAL_PIN_KINDS = {SecretKind.AUTH_PIN.value, SecretKind.SIGNING_PASSWORD.value}
CODE_SCREENS = {ScreenId.DELIVERED_CODE.value, ScreenId.ENTER_CODE.value}


def measure_phone(phone: Phone, observed: ObservedSe, tally: MessageTally,
                  slips: bool) -> PhoneMeasurement:
    app = phone.app
    if app is None or app.core.issuance is None:
        raise click.ClickException(f"{phone.device_id} never started an issuance")
    core, user = app.core, app.user
    saga_id = core.issuance.application_id
    seen = observed.seen
    holds = [h.held_s for h in core.secret_holds
             if h.kind in REAL_PIN_KINDS and h.saga_id == saga_id]
    result = phone.result
    set_times = list(seen.pin_set_at_s.values())
    finished = max(set_times) if set_times else None
    temp_set = next((p.at_s for p in seen.probes if p.moment == "temporary_pin_set"), None)
    first_signed = min((p.at_s for p in seen.probes if p.signature_valid), default=None)
    messages = tally.of(saga_id, phone.device_id)
    return PhoneMeasurement(
        device_id=phone.device_id,
        option=int(phone.pin_option),
        slips=slips,
        outcome=result.outcome if result else "not_run",
        user_actions=user.actions,
        screens=[s.value for s in user.screens_answered],
        code_screens=sum(1 for s in user.screens_answered if s.value in CODE_SCREENS),
        real_pin_hold_s=max(holds, default=0.0),
        issuance_s=(result.latency_s or 0.0) if result else 0.0,
        temporary_window_s=None if finished is None or temp_set is None
        else round(finished - temp_set, 6),
        signable_window_s=None if finished is None or first_signed is None
        else round(finished - first_signed, 6),
        probes=list(seen.probes),
        tsm_pin_commands=list(seen.tsm_pin_commands),
        app_pin_commands=list(seen.app_pin_commands),
        states=sorted(seen.states),
        messages=len(messages),
        round_trips=sum(m.round_trips for m in messages),
    )


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def summarise(option: PinOption, phones: list[PhoneMeasurement]) -> OptionMeasurement:
    normal = [p for p in phones if not p.slips] or phones
    slipper = next((p for p in phones if p.slips), None)
    temp_probes = [pr for p in phones for pr in p.probes if pr.moment == "temporary_pin_set"]
    release_probes = [pr for p in phones for pr in p.probes if pr.moment == "released"]
    tsm_functions = sorted({c for p in phones for c in p.tsm_pin_commands})
    app_functions = sorted({c for p in phones for c, _ in p.app_pin_commands})
    states = sorted({s for p in phones for s in p.states})
    new_states = [s for s in states if jpki.PinState[s] not in ISO_PIN_STATES]
    release_changes = sorted({
        c for p in phones for c in p.tsm_pin_commands
        if c in (INS_NAMES[i] for i in STATE_CHANGING_RELEASE)
    })
    hold = _median([p.real_pin_hold_s for p in normal])
    issuance = _median([p.issuance_s for p in normal])
    code_typed = any(p.code_screens for p in phones)
    return OptionMeasurement(
        option=int(option),
        title=STRATEGIES[option].title,
        phones=len(phones),
        issued=sum(1 for p in phones if p.outcome == "issued"),
        user_actions=_median([p.user_actions for p in normal]),
        extra_user_actions=0.0,  # against the reference option, filled in by ``compare``
        code_typed_by_user=code_typed,
        attack_in_temporary_state=any(pr.signature_valid for pr in temp_probes),
        attack_before_pin_change=any(pr.signature_valid for pr in release_probes),
        attack_detail=sorted({
            f"{pr.moment}: {pr.kind} {pr.state} VERIFY {pr.verify_sw} SIGN {pr.sign_sw}"
            for pr in temp_probes + release_probes
        }),
        temporary_window_s=_median([p.temporary_window_s or 0.0 for p in normal]),
        signable_window_s=_median([p.signable_window_s or 0.0 for p in normal]),
        mistype_possible=code_typed,
        mistype_cost=mistype_cost(slipper),
        real_pin_hold_s=round(hold, 6),
        real_pin_hold_share=round(hold / issuance, 4) if issuance else 0.0,
        tsm_functions=tsm_functions,
        applet_functions=sorted(set(app_functions) | {f"state {s}" for s in new_states}),
        new_tsm_function=bool(release_changes),
        new_applet_function=bool(new_states),
        messages=_median([p.messages for p in normal]),
        messages_added=0.0,
        round_trips=_median([p.round_trips for p in normal]),
        round_trips_added=0.0,
    )


def mistype_cost(slipper: PhoneMeasurement | None) -> str:
    """What one slip on a typed code cost, from the SE's own answers to the slipping user."""
    if slipper is None:
        return "not measured (one phone per option)"
    if not slipper.code_screens:
        return "not possible: nobody types a code"
    wrong = [(c, sw) for c, sw in slipper.app_pin_commands if sw.startswith("63C")]
    if not wrong:
        return "no slip reached the SE"
    command, sw = wrong[0]
    left = int(sw[3], 16)
    what = "PUK" if command == APP_INS_NAMES[jpki.INS_RESET_RETRY_COUNTER] else "PIN"
    return (
        f"{len(wrong)} {what} try spent per slip ({left} left); {left + 1} slips block it; "
        f"then {slipper.outcome}"
    )


def compare(measured: dict[PinOption, OptionMeasurement]) -> None:
    reference = measured[REFERENCE]
    for m in measured.values():
        m.extra_user_actions = m.user_actions - reference.user_actions
        m.messages_added = m.messages - reference.messages
        m.round_trips_added = m.round_trips - reference.round_trips
        derive_marks(m)


# ---------------------------------------------------------------------------------------
# From measurements to the seed's marks: the rules (docs/pin-options.md explains them)


def derive_marks(m: OptionMeasurement) -> None:
    option = PinOption(m.option)
    real_pin_held = m.real_pin_hold_share > HOLD_SHARE_DURING_ISSUANCE
    # Security: can the temporary PIN sign, who sees it, does the real PIN wait in the app.
    if real_pin_held or (m.attack_in_temporary_state and m.code_typed_by_user):
        m.security = "×"  # the real PIN exposed in the app, or a usable code handed to the user
    elif m.attack_in_temporary_state:
        m.security = "△"  # signs with the temporary PIN, but nobody ever sees it
    elif m.code_typed_by_user:
        m.security = "○"  # unusable, but a code that sets the PIN is in the user's hands
    else:
        m.security = "◎"  # unusable until the user's own PIN is set, nothing handed out
    # Convenience: extra user actions against the reference (the seed's normal sequence).
    m.convenience = "×" if m.extra_user_actions > 0 else "○"
    # Cost: functions the SP-TSM or the applet needs only for this option; added traffic.
    added_traffic = m.round_trips_added > 0
    if m.new_tsm_function and m.new_applet_function and added_traffic:
        m.cost = "×"
    elif m.new_tsm_function or m.new_applet_function or added_traffic:
        m.cost = "△"
    else:
        m.cost = "○"
    m.pros_cons = pros_cons(m)
    m.seed_security, m.seed_convenience, m.seed_cost = SEED_MARKS[option]
    m.seed_pros_cons = SEED_PROS_CONS[option]
    differ = [
        name for name, ours, seed in (
            ("security", m.security, m.seed_security),
            ("convenience", m.convenience, m.seed_convenience),
            ("cost", m.cost, m.seed_cost),
        ) if ours != seed
    ]
    m.agreement = "agrees" if not differ else "differs: " + ", ".join(differ)


def pros_cons(m: OptionMeasurement) -> str:
    parts = [
        f"✗ {m.extra_user_actions:g} extra user actions" if m.extra_user_actions > 0
        else "○ no user step",
        "✗ signs with the temporary PIN" if m.attack_in_temporary_state
        else "○ unusable in temp-PIN state",
    ]
    if m.attack_before_pin_change and not m.attack_in_temporary_state:
        parts.append(f"△ signable after release for {m.signable_window_s:.3f} s")
    elif m.attack_in_temporary_state:
        parts.append(f"signable for {m.signable_window_s:.3f} s")
    parts.append(f"✗ mistype: {m.mistype_cost}" if m.mistype_possible else "○ no mistyping")
    if m.real_pin_hold_share > HOLD_SHARE_DURING_ISSUANCE:
        parts.append(
            f"✗ real PIN in app memory {m.real_pin_hold_s:.3f} s "
            f"({m.real_pin_hold_share:.0%} of issuance)"
        )
    parts.append("△ SP-TSM needs a new function" if m.new_tsm_function
                 else "○ light on SP-TSM")
    if m.new_applet_function:
        parts.append("△ applet needs a new function")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------
# The run


@dataclass(slots=True)
class Measured:
    options: dict[PinOption, OptionMeasurement]
    audit: list[dict[str, str]]  # the invariant checker over the run's stores (jpki audit)


async def measure(phones_per_option: int, data_dir: Path, *, seed: int = 1,
                  key_pool: int | None = 16) -> Measured:
    options = list(STRATEGIES)
    settings = RunSettings(
        phones=phones_per_option * len(options), data_dir=data_dir, seed=seed,
        profile_mix="new=1", certificate_mix="both=1",
        pin_option_mix=",".join(f"{int(o)}=1" for o in options), key_pool=key_pool,
        device_prefix="pin-option",
    )
    tally = MessageTally()
    observed: dict[str, ObservedSe] = {}
    slippers: set[str] = set()
    fleets: list[Fleet] = []

    def instrument(fleet: Fleet) -> None:
        fleets.append(fleet)
        first: set[PinOption] = set()
        for phone in fleet.phones:
            observed[phone.device_id] = ObservedSe(phone.se)
            phone.se = observed[phone.device_id]  # type: ignore[assignment]
            if phones_per_option >= 2 and phone.pin_option not in first:
                first.add(phone.pin_option)
                slippers.add(phone.device_id)
                _slip_on_codes(phone)

    outcome = await run_stack(settings, EMBEDDED, on_transport=tally.attach, on_fleet=instrument)
    per_option: dict[PinOption, list[PhoneMeasurement]] = {o: [] for o in options}
    for phone in fleets[0].phones:
        per_option[phone.pin_option].append(measure_phone(
            phone, observed[phone.device_id], tally, phone.device_id in slippers
        ))
    measured = {o: summarise(o, phones) for o, phones in per_option.items()}
    compare(measured)
    return Measured(measured, outcome.audit)


def _slip_on_codes(phone: Phone) -> None:
    """This phone's user slips once when typing a code (the mistype measurement)."""
    install = phone.install_app

    def install_slipping(*args: Any, **kwargs: Any) -> Any:
        app = install(*args, **kwargs)
        app.user.script = dataclasses.replace(
            app.user.script, typos=app.user.script.typos | {ScreenId.ENTER_CODE}
        )
        return app

    phone.install_app = install_slipping  # type: ignore[method-assign]


def render(measured: dict[PinOption, OptionMeasurement], console: Console) -> None:
    table = Table(title="PIN-setting options: derived from measured runs (seed's marks beside)",
                  show_lines=True)
    for column in ("#", "option", "pros / cons (measured)", "security", "convenience", "cost",
                   "vs seed"):
        table.add_column(column, overflow="fold")
    for option in sorted(measured):
        m = measured[option]
        table.add_row(
            str(m.option), m.title, m.pros_cons,
            f"{m.security} (seed {m.seed_security})",
            f"{m.convenience} (seed {m.seed_convenience})",
            f"{m.cost} (seed {m.seed_cost})", m.agreement,
        )
    console.print(table)
    numbers = Table(title="measurements (median per option; reference option 2)")
    for column in ("#", "issued", "user actions", "extra", "attack temp-PIN state",
                   "attack after release", "temp-PIN s", "signable s", "real PIN held s",
                   "msgs", "+msgs", "TSM round trips", "TSM PIN functions", "app → applet"):
        numbers.add_column(column, overflow="fold")
    for option in sorted(measured):
        m = measured[option]
        numbers.add_row(
            str(m.option), f"{m.issued}/{m.phones}", f"{m.user_actions:g}",
            f"{m.extra_user_actions:+g}", _yes(m.attack_in_temporary_state),
            _yes(m.attack_before_pin_change), f"{m.temporary_window_s:.3f}",
            f"{m.signable_window_s:.3f}",
            f"{m.real_pin_hold_s:.4f} ({m.real_pin_hold_share:.0%})", f"{m.messages:g}",
            f"{m.messages_added:+g}", f"{m.round_trips:g}", ", ".join(m.tsm_functions),
            ", ".join(m.applet_functions),
        )
    console.print(numbers)
    for option in sorted(measured):
        m = measured[option]
        console.print(f"option {m.option} mistype: {m.mistype_cost}")


def _yes(flag: bool) -> str:
    return "signs" if flag else "refused"


@click.group("pin-options")
def pin_options_cli() -> None:
    """The seed's six PIN-setting options, measured."""


@pin_options_cli.command("report")
@click.option("--phones", type=click.IntRange(1, 50), default=3, show_default=True,
              help="phones per option; with 2 or more the first one's user slips once")
@click.option("--json", "as_json", is_flag=True, help="print the measurements per option")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="keep the run's stores here (default: a temporary directory)")
@click.option("--log-level", default="ERROR", show_default=True)
def report_command(phones: int, as_json: bool, seed: int, data_dir: Path | None,
                   log_level: str) -> None:
    """Run every option on a small fleet (embedded default) and print the seed's table."""
    configure_logging("pin-options", level=log_level, pretty=False)
    with tempfile.TemporaryDirectory(prefix="jpki-pin-options-") as scratch:
        directory = data_dir or Path(scratch)
        run = asyncio.run(measure(phones, directory, seed=seed))
    measured = run.options
    if as_json:
        click.echo(json.dumps([asdict(measured[o]) for o in sorted(measured)],
                              indent=2, ensure_ascii=False))
    else:
        render(measured, Console(width=200))
        if not run.audit:
            click.echo("audit: every invariant holds")
    if run.audit:
        for violation in run.audit:
            click.echo(f"audit: BROKEN {violation['invariant']}: {violation['subject']}: "
                       f"{violation['detail']}", err=True)
        sys.exit(1)
