"""A fleet of simulated phones: people with My Number Cards, phones with secure elements,
and the UI app on each, run against the back end over MQTT (or the in-process link).

Creating a fleet *manufactures*: every phone gets an SE whose SP-TSM keys are diversified
from the TSM's master keys (``workers.tsm.provisioning``), every person a My Number Card
personalised with card certificates from the JPKI CA. Phone profiles (issue 6):

- ``new``: a phone fresh from the shop;
- ``second_hand``: a previous owner went through issuance on it and sold it after a factory
  reset, so its SE still holds that stranger's keyed applet;
- ``reinstalled``: the owner went through issuance, then reinstalled the app, so the SE holds
  the owner's own keyed applet and the app remembers nothing;
- ``unsupported``: a model the JPKI applet is not certified for.

The previous issuance of the second two profiles is a real one through the back end, so
the states their SEs, the TSM registry and the CA are in are the ones the system made.

Network faults (``NetworkFaults``) wrap a phone's link: added latency on every message,
SP-TSM traffic dropped at random (the saga's SE step retries recover it; app traffic is not
dropped because no one re-sends what the user typed), and a disconnect in the middle of the
saga followed by a reconnect with the same persistent session.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import functools
import json
import random
import resource
import string
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import click
import structlog

from device_sim.app import (
    DELETED_MARK,
    AppCore,
    DeviceInfo,
    PhoneApp,
    ScreenId,
    UserScript,
    VirtualUser,
)
from device_sim.card import (
    CardCertificateRequest,
    CardCertificates,
    CardHolder,
    MyNumberCard,
    manufacture_card,
)
from device_sim.relying_party import HttpOcspClient, LoginRefused, RelyingParty
from device_sim.se.element import SecureElement
from device_sim.se.jpki_applet import (
    GeneratedKeys,
    JpkiAppletFactory,
    KeySource,
    PooledKeys,
    Profile,
    default_data_dir,
)
from infra import eventloop
from infra.bus import Bus
from infra.heap import freeze_start_up_objects
from infra.logging import configure_logging
from infra.mqtt import TOPIC_ROOT, MqttPhoneLink
from infra.transport.phone_link import DownHandler, InProcessPhoneHub, PhoneLink
from orchestrator import messages as om
from protocol.envelope import Message
from protocol.errors import JpkiError
from workers.ca.authority import CertificateAuthority, PendingCardCertificates
from workers.ca.authority import Person as CaPerson
from workers.ca.profiles import BasicFacts, Sex
from workers.tsm.keys import MasterKeyRing
from workers.tsm.provisioning import manufacture_secure_element

log = structlog.get_logger(__name__)


class PhoneProfile(enum.StrEnum):
    NEW = "new"
    SECOND_HAND = "second_hand"
    REINSTALLED = "reinstalled"
    UNSUPPORTED = "unsupported"


SUPPORTED_MODELS = ("Pixel 9", "Galaxy S25", "Xperia 1 VI", "AQUOS sense9", "arrows We2")
UNSUPPORTED_MODELS = ("Legacy Phone 3", "Feature Flip 2")
CERTIFICATE_CHOICES = ("both", "auth", "sign")


class FleetConfigError(JpkiError):
    """A fleet option that does not parse (profile mix, certificate mix, ...)."""


def parse_mix(text: str, names: Sequence[str]) -> dict[str, float]:
    """``"new=70,second_hand=10"`` → weights; names not given get 0."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in names:
            raise FleetConfigError(f"unknown name {name!r} in mix (one of {', '.join(names)})")
        try:
            weights[name] = float(value)
        except ValueError:
            raise FleetConfigError(f"weight of {name!r} is not a number") from None
        if weights[name] < 0:
            raise FleetConfigError(f"weight of {name!r} is negative")
    if not weights or sum(weights.values()) <= 0:
        raise FleetConfigError("a mix needs at least one positive weight")
    return weights


def spread(weights: Mapping[str, float], n: int) -> list[str]:
    """Exactly ``n`` names in the given proportions (largest remainders), in a fixed order."""
    total = sum(weights.values())
    exact = {name: n * w / total for name, w in weights.items()}
    counts = {name: int(v) for name, v in exact.items()}
    for name in sorted(exact, key=lambda k: exact[k] - counts[k], reverse=True)[
        : n - sum(counts.values())
    ]:
        counts[name] += 1
    return [name for name in weights for _ in range(counts[name])]


@dataclass(frozen=True, slots=True)
class NetworkFaults:
    latency_s: float = 0.0  # added to every message, each way
    drop_rate: float = 0.0  # probability of losing an SP-TSM script or its result
    disconnect_rate: float = 0.0  # share of phones that lose their link mid-saga
    reconnect_after_s: float = 0.5

    @property
    def any(self) -> bool:
        return bool(self.latency_s or self.drop_rate or self.disconnect_rate)


@dataclass(frozen=True, slots=True)
class FleetConfig:
    phones: int
    profile_mix: Mapping[str, float] = field(default_factory=lambda: {PhoneProfile.NEW.value: 1.0})
    certificate_mix: Mapping[str, float] = field(default_factory=lambda: {"both": 1.0})
    pin_option_mix: Mapping[str, float] = field(default_factory=lambda: {"4": 1.0})
    typo_rate: float = 0.0  # share of users who slip once on the card password and a PIN
    faults: NetworkFaults = NetworkFaults()
    seed: int = 1
    device_prefix: str = "phone"
    # How long a phone waits for its saga's end. Longer than the back end's per-step retries
    # under load: a phone that gives up early leaves a saga to end without it.
    saga_timeout_s: float = 300.0


# ---------------------------------------------------------------------------------------
# People and their cards


@dataclass(eq=False)
class Person:
    person_id: str
    holder: CardHolder
    card: MyNumberCard = field(repr=False)
    card_password: str = field(repr=False)
    auth_pin: str = field(repr=False)
    signing_password: str = field(repr=False)

    def script(self, certificates: str, pin_option: om.PinOption, typos: bool) -> UserScript:
        slips = frozenset({ScreenId.CARD_PASSWORD, ScreenId.SET_AUTH_PIN}) if typos else frozenset()
        return UserScript(
            card_password=self.card_password,
            auth_pin=self.auth_pin,
            signing_password=self.signing_password,
            certificates=certificates,
            pin_option=pin_option,
            typos=slips,
        )


CardIssuerFactory = Callable[[str], Callable[[CardCertificateRequest], CardCertificates]]

# A card is valid for ten years from issue (J-LIS); its certificates stop at the 5th birthday.
CARD_LIFETIME = dt.timedelta(days=3652)


class CaCardFactory:
    """The card factory's line to the JPKI CA: signs card certificates while a card is being
    personalised (synchronously, as the card's issuer callback must), and records them with
    the CA afterwards, so that the CA knows every card it will verify."""

    def __init__(self, authority: CertificateAuthority) -> None:
        self._authority = authority
        self._pending: list[PendingCardCertificates] = []

    def issuer_for(self, person_id: str) -> Callable[[CardCertificateRequest], CardCertificates]:
        def issue(request: CardCertificateRequest) -> CardCertificates:
            holder = request.holder
            person = CaPerson(
                person_id,
                BasicFacts(holder.name, holder.date_of_birth, Sex(holder.sex), holder.address),
                holder.prefecture,
                holder.city,
            )
            pending = self._authority.build_card_certificates(
                person,
                request.auth_public_key,
                request.sign_public_key,
                card_expiry=dt.datetime.now(dt.UTC) + CARD_LIFETIME,
            )
            self._pending.append(pending)
            return CardCertificates(
                auth_certificate=pending.auth.der,
                auth_ca_certificate=pending.auth.ca_der,
                sign_certificate=pending.sign.der,
                sign_ca_certificate=pending.sign.ca_der,
            )

        return issue

    async def record(self) -> int:
        pending, self._pending = self._pending, []
        # One transaction for the whole batch: a commit per card would be a disk sync each.
        async with self._authority.database.transaction() as conn:
            for certificates in pending:
                await self._authority.record_card_certificates(certificates, conn=conn)
        return len(pending)


PREFECTURES = (
    ("東京都", "千代田区"),
    ("大阪府", "大阪市"),
    ("北海道", "札幌市"),
    ("福岡県", "福岡市"),
)


def _random_text(rng: random.Random, alphabet: str, length: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(length))


def make_person(
    index: int,
    rng: random.Random,
    issuer_for: CardIssuerFactory,
    key_source: KeySource,
) -> Person:
    """A person with a personalised My Number Card; the card's PINs and the phone PINs
    they will choose are theirs alone (random per person)."""
    prefecture, city = PREFECTURES[index % len(PREFECTURES)]
    holder = CardHolder(
        name=f"試験 利用者{index}",
        date_of_birth=dt.date(
            1950 + rng.randrange(55), 1 + rng.randrange(12), 1 + rng.randrange(28)
        ),
        sex=rng.choice("12"),
        address=f"{prefecture}{city}1-{index}",
        prefecture=prefecture,
        city=city,
    )
    person_id = f"person-{index:06d}-{rng.getrandbits(32):08x}"
    upper_digits = string.ascii_uppercase + string.digits
    card_password = _random_text(rng, upper_digits, 8)
    card = manufacture_card(
        holder,
        issuer_for(person_id),
        auth_pin=_random_text(rng, string.digits, 4),
        sign_password=card_password,
        key_source=key_source,
        random_bytes=rng.randbytes,
    )
    return Person(
        person_id=person_id,
        holder=holder,
        card=card,
        card_password=card_password,
        auth_pin=_random_text(rng, string.digits, 4),
        signing_password=_random_text(rng, upper_digits, 10),
    )


# ---------------------------------------------------------------------------------------
# Phones


@dataclass(slots=True)
class PhoneResult:
    """How one phone's run ended: what a fleet report lists per phone."""

    device_id: str
    profile: str
    model: str
    certificates: str
    pin_option: int
    outcome: str = "not_run"
    phase: int = 1
    reason: str | None = None
    login: str = "n/a"  # "ok", "refused:<reason>", "n/a" (no auth certificate) or "failed"
    prior_outcome: str | None = None  # second-hand / reinstalled: the earlier issuance
    owner: str = ""  # person id of the phone's user (opaque, as the CA knows them)
    previous_owner: str | None = None  # second-hand: who used the phone before
    scripts: list[str] = field(default_factory=list)  # SP-TSM operations on the SE, in order
    screens: int = 0
    user_actions: int = 0
    # Per kind of secret (card password, new PINs, temporary PINs): the longest time one
    # sat in the app's memory, keystroke (or arrival) to wipe.
    secret_hold_max_s: dict[str, float] = field(default_factory=dict)
    latency_s: float | None = None
    disconnects: int = 0


@dataclass(eq=False)
class Phone:
    device_id: str
    profile: PhoneProfile
    device: DeviceInfo
    se: SecureElement = field(repr=False)
    owner: Person
    previous_owner: Person | None
    certificates: str
    pin_option: om.PinOption
    typos: bool
    app: PhoneApp | None = field(default=None, repr=False)
    result: PhoneResult | None = None

    @property
    def se_identity(self) -> om.SeIdentity:
        identity = self.se.identity
        return om.SeIdentity(cin=identity.cin.hex().upper(), kdd=identity.kdd.hex().upper())

    def install_app(
        self, person: Person, link: PhoneLink, *, certificates: str | None = None
    ) -> PhoneApp:
        """Install the app from scratch (first install, reinstall, or after a factory reset):
        its storage starts empty; the SE keeps whatever it holds."""
        core = AppCore(self.device, self.se, self.se_identity)
        script = person.script(certificates or self.certificates, self.pin_option, self.typos)
        self.app = PhoneApp(core, VirtualUser(script, person.card), link)
        return self.app

    async def deliver(self, message: Message) -> None:
        if self.app is not None:
            await self.app.deliver(message)


# ---------------------------------------------------------------------------------------
# Network faults around a phone's link

LinkFactory = Callable[[str], PhoneLink]


class FaultyLink(PhoneLink):
    """A phone link with latency, dropped SP-TSM traffic and one planned disconnect."""

    def __init__(
        self, make_link: LinkFactory, device_id: str, faults: NetworkFaults, rng: random.Random
    ) -> None:
        self.device_id = device_id
        self._make_link = make_link
        self._faults = faults
        self._rng = rng
        self._inner: PhoneLink | None = None
        self._handler: DownHandler | None = None
        self._up = asyncio.Event()
        self._disconnect_after: int | None = None  # down messages until the disconnect
        self._bounce: asyncio.Task[None] | None = None
        self._outbox: deque[Message] = deque()
        self.dropped = 0
        self.disconnects = 0

    def arm_disconnect(self) -> None:
        """Lose the link after the 2nd to 4th message of the saga about to start."""
        if self._rng.random() < self._faults.disconnect_rate:
            self._disconnect_after = self._rng.randint(2, 4)

    async def start(self, on_message: DownHandler) -> None:
        self._handler = on_message
        await self._connect()

    async def _connect(self) -> None:
        inner = self._inner = self._make_link(self.device_id)
        await inner.start(self._on_down)
        while self._outbox:  # what the app sent meanwhile joins the end: order holds
            await inner.send(self._outbox.popleft())
        self._up.set()

    def _drop(self, message: Message) -> bool:
        if message.envelope.type.startswith(("se.cmd.", "se.result.")) and (
            self._rng.random() < self._faults.drop_rate
        ):
            self.dropped += 1
            log.info("fleet.message_dropped", device_id=self.device_id, type=message.envelope.type)
            return True
        return False

    async def _on_down(self, message: Message) -> None:
        if self._faults.latency_s:
            await asyncio.sleep(self._faults.latency_s)
        if self._drop(message) or self._handler is None:
            return
        await self._handler(message)
        if self._disconnect_after is not None:
            self._disconnect_after -= 1
            if self._disconnect_after <= 0:
                self._disconnect_after = None
                # Not from inside the link's own receive task: let it acknowledge first.
                self._bounce = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        await asyncio.sleep(0.01)
        self._up.clear()
        if self._inner is not None:
            await self._inner.close()
        self.disconnects += 1
        log.info("fleet.disconnected", device_id=self.device_id)
        await asyncio.sleep(self._faults.reconnect_after_s)
        await self._connect()
        log.info("fleet.reconnected", device_id=self.device_id)

    async def send(self, message: Message) -> None:
        if self._faults.latency_s:
            await asyncio.sleep(self._faults.latency_s)
        if self._drop(message):
            return
        if not self._up.is_set() or self._inner is None:
            # Offline: kept in the client's outbox, as an MQTT client with a persistent
            # session does, and sent on reconnection. Waiting here instead would hold the
            # app while the reconnection hands it the messages that waited for it.
            self._outbox.append(message)
            return
        await self._inner.send(message)

    async def close(self) -> None:
        if self._bounce is not None:
            await asyncio.gather(self._bounce, return_exceptions=True)
        self._up.clear()
        if self._inner is not None:
            await self._inner.close()
            self._inner = None


# ---------------------------------------------------------------------------------------
# The fleet


@dataclass(frozen=True, slots=True)
class Summary:
    phones: int
    outcomes: dict[str, int]
    by_profile: dict[str, dict[str, int]]
    logins: dict[str, int]
    certificates_issued: int
    latency_p50_s: float | None
    latency_p95_s: float | None
    wall_s: float
    process_cpu_s: float  # this process's CPU while the phones ran
    issuances_per_s: float
    certificates_per_s: float
    max_rss_mib: float
    secret_hold_max_s: dict[str, float]  # per kind, over every phone
    failures: list[dict[str, Any]]


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def max_rss_mib() -> float:
    """Peak resident set of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except OSError:
        return max_rss_mib()
    return pages * resource.getpagesize() / (1024 * 1024)


class Fleet:
    """Phones and people, manufactured; ``run`` takes every phone through issuance."""

    def __init__(self, config: FleetConfig, phones: list[Phone]) -> None:
        self.config = config
        self.phones = phones
        self.results: list[PhoneResult] = []
        self.wall_s = 0.0
        self.cpu_s = 0.0

    @classmethod
    def manufacture(
        cls,
        config: FleetConfig,
        keys: MasterKeyRing,
        issuer_for: CardIssuerFactory,
        *,
        se_key_source: KeySource,
        card_key_source: KeySource,
    ) -> Fleet:
        rng = random.Random(config.seed)
        profiles = spread(config.profile_mix, config.phones)
        certificates = spread(config.certificate_mix, config.phones)
        pin_options = spread(config.pin_option_mix, config.phones)
        # Deterministic but not in blocks: shuffle each assignment with the seed.
        for assignment in (profiles, certificates, pin_options):
            rng.shuffle(assignment)
        factory = JpkiAppletFactory(Profile.PHONE, se_key_source)
        phones: list[Phone] = []
        for index in range(config.phones):
            profile = PhoneProfile(profiles[index])
            device_id = f"{config.device_prefix}-{index:05d}"
            cin = (config.seed.to_bytes(4, "big") + index.to_bytes(6, "big"))[-10:]
            se = manufacture_secure_element(keys, cin, factory, random=rng.randbytes)
            model = rng.choice(
                UNSUPPORTED_MODELS if profile is PhoneProfile.UNSUPPORTED else SUPPORTED_MODELS
            )
            owner = make_person(2 * index, rng, issuer_for, card_key_source)
            previous = (
                make_person(2 * index + 1, rng, issuer_for, card_key_source)
                if profile is PhoneProfile.SECOND_HAND
                else None
            )
            phones.append(
                Phone(
                    device_id=device_id,
                    profile=profile,
                    device=DeviceInfo(
                        device_id, model, "Android", str(rng.choice((13, 14, 15))), True
                    ),
                    se=se,
                    owner=owner,
                    previous_owner=previous,
                    certificates=certificates[index],
                    pin_option=om.PinOption(int(pin_options[index])),
                    typos=rng.random() < config.typo_rate,
                )
            )
        log.info("fleet.manufactured", phones=len(phones), rss_mib=round(current_rss_mib(), 1))
        return cls(config, phones)

    async def run(
        self,
        make_link: LinkFactory,
        *,
        relying_party: RelyingParty | None = None,
        concurrency: int | None = None,
        on_result: Callable[[PhoneResult], None] | None = None,
    ) -> list[PhoneResult]:
        """Every phone through its profile's story, at most ``concurrency`` at a time."""
        gate = asyncio.Semaphore(concurrency or len(self.phones) or 1)
        rng = random.Random(self.config.seed + 1)

        async def one(phone: Phone) -> PhoneResult:
            async with gate:
                result = await run_phone(
                    phone, make_link, self.config, random.Random(rng.random()), relying_party
                )
            if on_result is not None:
                on_result(result)
            return result

        started, cpu_started = time.monotonic(), time.process_time()
        self.results = list(await asyncio.gather(*(one(phone) for phone in self.phones)))
        self.wall_s = time.monotonic() - started
        self.cpu_s = time.process_time() - cpu_started
        return self.results

    def summary(self) -> Summary:
        outcomes: dict[str, int] = {}
        by_profile: dict[str, dict[str, int]] = {}
        logins: dict[str, int] = {}
        for r in self.results:
            outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
            per = by_profile.setdefault(r.profile, {})
            per[r.outcome] = per.get(r.outcome, 0) + 1
            logins[r.login] = logins.get(r.login, 0) + 1
        issued = [r for r in self.results if r.outcome == om.Outcome.ISSUED.value]
        certificates = sum(2 if r.certificates == "both" else 1 for r in issued)
        latencies = [r.latency_s for r in issued if r.latency_s is not None]
        wall = self.wall_s or 1e-9
        return Summary(
            phones=len(self.results),
            outcomes=outcomes,
            by_profile=by_profile,
            logins=logins,
            certificates_issued=certificates,
            latency_p50_s=percentile(latencies, 0.50),
            latency_p95_s=percentile(latencies, 0.95),
            wall_s=round(self.wall_s, 3),
            process_cpu_s=round(self.cpu_s, 3),
            issuances_per_s=round(len(issued) / wall, 2),
            certificates_per_s=round(certificates / wall, 2),
            max_rss_mib=round(max_rss_mib(), 1),
            secret_hold_max_s={
                kind: max(r.secret_hold_max_s.get(kind, 0.0) for r in self.results)
                for kind in sorted({k for r in self.results for k in r.secret_hold_max_s})
            },
            failures=[
                {
                    "device_id": r.device_id,
                    "profile": r.profile,
                    "outcome": r.outcome,
                    "reason": r.reason,
                }
                for r in self.results
                if r.outcome != om.Outcome.ISSUED.value
            ],
        )

    def report(self) -> dict[str, Any]:
        return {"summary": asdict(self.summary()), "phones": [asdict(r) for r in self.results]}

    def save(self, data_dir: Path) -> None:
        """Each phone's SE and app storage, for inspection after the run (``jpki audit``)."""
        root = data_dir / "phones"
        root.mkdir(parents=True, exist_ok=True)
        for phone in self.phones:
            phone.se.save(root / f"{phone.device_id}.se.json")
            if phone.app is not None:
                app_state = {**phone.app.core.storage.to_state(), "profile": phone.profile.value}
                (root / f"{phone.device_id}.app.json").write_text(json.dumps(app_state))


async def run_phone(
    phone: Phone,
    make_link: LinkFactory,
    config: FleetConfig,
    rng: random.Random,
    relying_party: RelyingParty | None,
) -> PhoneResult:
    """One phone's story: (an earlier issuance,) issuance, then a login in phase 4."""
    result = PhoneResult(
        device_id=phone.device_id,
        profile=phone.profile.value,
        model=phone.device.model,
        certificates=phone.certificates,
        pin_option=int(phone.pin_option),
        owner=phone.owner.person_id,
        previous_owner=phone.previous_owner.person_id if phone.previous_owner else None,
    )
    phone.result = result
    faulty = (
        FaultyLink(make_link, phone.device_id, config.faults, rng) if config.faults.any else None
    )
    link: PhoneLink = faulty or make_link(phone.device_id)
    try:
        await link.start(phone.deliver)
        if phone.profile in (PhoneProfile.SECOND_HAND, PhoneProfile.REINSTALLED):
            # The earlier life of the phone: someone reached phase 4 on it, then the app
            # went away (factory reset before the sale, or an uninstall) and the SE stayed.
            earlier = phone.previous_owner or phone.owner
            earlier_app = phone.install_app(earlier, link, certificates="both")
            prior = await asyncio.wait_for(earlier_app.apply(), config.saga_timeout_s)
            result.prior_outcome = prior.outcome
        app = phone.install_app(phone.owner, link)
        if faulty is not None:
            faulty.arm_disconnect()
        started = time.monotonic()
        finished = await asyncio.wait_for(app.apply(), config.saga_timeout_s)
        result.latency_s = round(time.monotonic() - started, 4)
        result.outcome, result.phase, result.reason = (
            finished.outcome,
            finished.phase,
            finished.reason,
        )
        if finished.outcome == om.Outcome.ISSUED.value and phone.certificates in ("both", "auth"):
            result.login = await log_in(app, relying_party) if relying_party else "not_tried"
    except TimeoutError:
        result.outcome, result.reason = "timeout", "no result from the back end in time"
    except JpkiError as exc:
        result.outcome, result.reason = "error", type(exc).__name__
    finally:
        await link.close()
    if phone.app is not None:
        core = phone.app.core
        result.scripts = list(core.scripts_run)
        result.screens = len(core.screens_shown)
        result.user_actions = phone.app.user.actions
        for hold in core.secret_holds:
            longest = max(result.secret_hold_max_s.get(hold.kind, 0.0), round(hold.held_s, 6))
            result.secret_hold_max_s[hold.kind] = longest
    if faulty is not None:
        result.disconnects = faulty.disconnects
    log.info(
        "fleet.phone_done",
        device_id=phone.device_id,
        profile=result.profile,
        outcome=result.outcome,
        reason=result.reason,
        login=result.login,
    )
    return result


async def log_in(app: PhoneApp, relying_party: RelyingParty) -> str:
    """Phase 4: the relying party's challenge, signed on the SE after the auth PIN."""
    challenge = relying_party.challenge()
    signed = await app.log_in("relying party", challenge.challenge_id, challenge.nonce)
    if signed is None:
        return "failed"
    try:
        await relying_party.login(
            challenge.challenge_id, challenge.nonce, signed.certificate, signed.signature
        )
    except LoginRefused as refused:
        return f"refused:{refused.reason.value}"
    return "ok"


# ---------------------------------------------------------------------------------------
# ``jpki fleet``: the phones as their own process, against the real services


def expected(result: PhoneResult, *, login: bool = True) -> bool:
    """What the run promises per phone: unsupported phones refused, every other one issued
    and, with an authentication certificate, logged in at the relying party (unless the
    run left phase 4 out)."""
    if result.profile == PhoneProfile.UNSUPPORTED.value:
        return result.outcome == om.Outcome.REFUSED.value
    if result.outcome != om.Outcome.ISSUED.value:
        return False
    if result.profile in (PhoneProfile.SECOND_HAND.value, PhoneProfile.REINSTALLED.value):
        if not applet_deleted_first(result.scripts):
            return False
    # "n/a": issued without an authentication certificate, so there is no login to try
    return result.login in (("ok", "n/a") if login else ("not_tried", "n/a"))


def applet_deleted_first(scripts: Sequence[str]) -> bool:
    """Phase 2's rule for a keyed applet: it was deleted before the new one was installed,
    by an earlier script or earlier in the ``prepare`` script (DELETE, then INSTALL)."""
    deleted = False
    for op in scripts:
        if op.startswith(("install", "prepare")):  # the first installation decides
            return deleted or (op.startswith("prepare") and op.endswith(DELETED_MARK))
        deleted = deleted or op.endswith(DELETED_MARK)
    return False


def format_results(results: Sequence[PhoneResult], summary: Summary) -> str:
    lines = [
        f"{'device':<14}{'profile':<13}{'certs':<6}{'pin':<4}{'outcome':<10}{'phase':<6}"
        f"{'login':<22}{'latency':>9}  reason"
    ]
    for r in results:
        latency = f"{r.latency_s:.3f}s" if r.latency_s is not None else "-"
        lines.append(
            f"{r.device_id:<14}{r.profile:<13}{r.certificates:<6}{r.pin_option:<4}"
            f"{r.outcome:<10}{r.phase:<6}{r.login:<22}{latency:>9}  {r.reason or ''}"
        )
    lines += [
        "",
        f"phones {summary.phones}: "
        + ", ".join(f"{k} {v}" for k, v in sorted(summary.outcomes.items())),
        "logins: " + ", ".join(f"{k} {v}" for k, v in sorted(summary.logins.items())),
        f"certificates issued {summary.certificates_issued}; {summary.issuances_per_s}/s "
        f"issuances, {summary.certificates_per_s}/s certificates over {summary.wall_s}s",
        f"saga latency (phone side) p50 {summary.latency_p50_s}s p95 {summary.latency_p95_s}s",
        f"peak RSS of this fleet process: {summary.max_rss_mib} MiB",
        "longest a secret sat in an app: "
        + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in summary.secret_hold_max_s.items()),
    ]
    return "\n".join(lines)


async def _fleet_main(
    *,
    phones: int,
    data_dir: Path,
    mqtt_url: str,
    amqp_url: str | None,
    link_kind: str,
    db_url: str | None,
    ocsp_url: str,
    config: FleetConfig,
    key_pool: int | None,
    concurrency: int | None,
    hold_only: bool = False,
    topic_root: str = TOPIC_ROOT,
    login: bool = True,
) -> Fleet:
    # Imported here: the embedded runner owns the local secrets and key files of a data
    # directory, and this command must read the same ones as the services it runs against.
    from jpki.run import local_secret, tsm_key_ring
    from workers.ca.keystore import Passphrase
    from workers.ca.profiles import CaKind

    authority = await CertificateAuthority.open(
        data_dir, Passphrase(local_secret(data_dir, "ca", "JPKI_CA_PASSPHRASE")), db_url=db_url
    )
    ring = tsm_key_ring(data_dir)
    keys: KeySource
    if key_pool:
        # the pool is test material, not the run's: kept once for every run, as the benchmarks'
        keys = PooledKeys(key_pool, default_data_dir() / "key-pool", random.Random(config.seed))
    else:
        keys = GeneratedKeys()
    cards = CaCardFactory(authority)
    fleet = await asyncio.to_thread(
        Fleet.manufacture, config, ring, cards.issuer_for, se_key_source=keys, card_key_source=keys
    )
    await cards.record()
    trusted = [g.certificate for g in authority.generations() if g.kind is CaKind.AUTH]
    await authority.close()
    click.echo(f"fleet: {phones} phones manufactured, RSS {current_rss_mib():.0f} MiB; running")

    transport: Any = None
    hub: InProcessPhoneHub | None = None
    make_link: LinkFactory
    if link_kind == "mqtt":
        make_link = functools.partial(mqtt_link, mqtt_url, topic_root)
    else:
        from infra.transport.rabbitmq import RabbitMQTransport

        if amqp_url is None:
            raise click.UsageError("--link amqp needs --amqp-url")
        transport = RabbitMQTransport(amqp_url, connection_name="jpki-fleet")
        await transport.connect()
        hub = InProcessPhoneHub(Bus(transport))
        await hub.start()
        make_link = hub.link
    freeze_start_up_objects()

    if hold_only:
        await hold_sessions(fleet, make_link)
        if hub is not None:
            await hub.close()
        if transport is not None:
            await transport.close()
        return fleet

    done = 0

    def progress(result: PhoneResult) -> None:
        nonlocal done
        done += 1
        if done % max(1, phones // 10) == 0 or done == phones:
            click.echo(f"fleet: {done}/{phones} done (last {result.device_id}: {result.outcome})")

    try:
        async with aiohttp.ClientSession() as session:
            relying_party = RelyingParty(trusted, HttpOcspClient(session), ocsp_url=ocsp_url)
            await fleet.run(make_link, relying_party=relying_party if login else None,
                            concurrency=concurrency, on_result=progress)
    finally:
        if hub is not None:
            await hub.close()
        if transport is not None:
            await transport.close()
    return fleet


def mqtt_link(url: str, topic_root: str, device_id: str) -> PhoneLink:
    """The phone's own MQTT session (its client id is derived from the device id)."""
    return MqttPhoneLink(url, device_id, topic_root=topic_root)


async def hold_sessions(fleet: Fleet, make_link: LinkFactory, connecting: int = 100) -> float:
    """Connect every phone's own link (an MQTT session each) at once, hold them, and report
    this process's memory: what one fleet process needs per phone online."""
    links = [make_link(phone.device_id) for phone in fleet.phones]
    gate = asyncio.Semaphore(connecting)  # bounded connection storm on the broker

    async def connect(link: PhoneLink, phone: Phone) -> None:
        async with gate:
            await link.start(phone.deliver)

    started = time.monotonic()
    try:
        await asyncio.gather(
            *(connect(link, p) for link, p in zip(links, fleet.phones, strict=True))
        )
        connected_s = time.monotonic() - started
        await asyncio.sleep(1.0)
        rss = current_rss_mib()
        click.echo(
            f"fleet: {len(links)} phones online, each with its own session "
            f"(connected in {connected_s:.1f}s); RSS {rss:.1f} MiB, peak {max_rss_mib():.1f} MiB, "
            f"{rss * 1024 / max(1, len(links)):.0f} KiB per phone"
        )
    finally:
        await asyncio.gather(*(link.close() for link in links), return_exceptions=True)
    return rss


@click.command("fleet")
@click.option("--phones", type=int, default=50, show_default=True)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="the services' data directory: CA keys, TSM key file, phones' SE state",
)
@click.option(
    "--mqtt-url",
    envvar="JPKI_MQTT_URL",
    default="mqtt://127.0.0.1:1883",
    show_default=True,
    help="env JPKI_MQTT_URL",
)
@click.option(
    "--amqp-url",
    envvar="JPKI_AMQP_URL",
    default=None,
    help="env JPKI_AMQP_URL; only for --link amqp",
)
@click.option(
    "--link",
    "link_kind",
    type=click.Choice(["mqtt", "amqp"]),
    default="mqtt",
    show_default=True,
    help="each phone its own MQTT session, or all on one AMQP link",
)
@click.option(
    "--db-url",
    envvar="JPKI_DB_URL",
    default=None,
    help="the CA's database (to issue the cards' certificates); default SQLite",
)
@click.option(
    "--ocsp-url",
    envvar="JPKI_OCSP_URL",
    default="http://127.0.0.1:8080/ocsp",
    show_default=True,
    help="the CA's OCSP responder, for the relying party",
)
@click.option(
    "--profile-mix",
    default="new=70,second_hand=10,reinstalled=10,unsupported=10",
    show_default=True,
)
@click.option("--certificate-mix", default="both=80,auth=10,sign=10", show_default=True)
@click.option("--pin-options", default="4=1", show_default=True, help="e.g. 4=80,3=20")
@click.option("--typo-rate", type=float, default=0.1, show_default=True)
@click.option("--latency-ms", type=float, default=0.0, show_default=True)
@click.option("--drop-rate", type=float, default=0.0, show_default=True)
@click.option("--disconnect-rate", type=float, default=0.0, show_default=True)
@click.option("--concurrency", type=int, default=None, help="phones applying at once (default all)")
@click.option("--timeout", "saga_timeout", type=float, default=300.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--key-pool", is_flag=True, help="SE and card key pairs from the pre-generated pool")
@click.option("--key-pool-size", type=int, default=64, show_default=True)
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option(
    "--topic-root",
    envvar="JPKI_TOPIC_ROOT",
    default=TOPIC_ROOT,
    show_default=True,
    help="env JPKI_TOPIC_ROOT; the gateway's --topic-root (runs apart on one broker)",
)
@click.option(
    "--device-prefix",
    default="phone",
    show_default=True,
    help="device ids are <prefix>-<n>: distinct prefixes keep fleets apart on one broker",
)
@click.option(
    "--hold-only",
    is_flag=True,
    help="only connect every phone, report memory per phone, disconnect",
)
@click.option("--login/--no-login", default=True, show_default=True,
              help="phase 4: each issued phone logs in at the relying party (OCSP checked)")
@click.option("--log-level", default="WARNING", show_default=True)
def fleet_command(
    phones: int,
    data_dir: Path,
    mqtt_url: str,
    amqp_url: str | None,
    link_kind: str,
    db_url: str | None,
    ocsp_url: str,
    profile_mix: str,
    certificate_mix: str,
    pin_options: str,
    typo_rate: float,
    latency_ms: float,
    drop_rate: float,
    disconnect_rate: float,
    concurrency: int | None,
    saga_timeout: float,
    seed: int | None,
    key_pool: bool,
    key_pool_size: int,
    report: Path | None,
    topic_root: str,
    device_prefix: str,
    hold_only: bool,
    login: bool,
    log_level: str,
) -> None:
    """Run PHONES simulated phones against the running services and report each outcome."""
    configure_logging("fleet", level=log_level)
    try:
        config = FleetConfig(
            phones=phones,
            profile_mix=parse_mix(profile_mix, [p.value for p in PhoneProfile]),
            certificate_mix=parse_mix(certificate_mix, CERTIFICATE_CHOICES),
            pin_option_mix=parse_mix(pin_options, [str(int(o)) for o in om.PinOption]),
            typo_rate=typo_rate,
            faults=NetworkFaults(latency_ms / 1000, drop_rate, disconnect_rate),
            seed=seed if seed is not None else random.SystemRandom().randrange(2**31),
            saga_timeout_s=saga_timeout,
            device_prefix=device_prefix,
        )
    except FleetConfigError as exc:
        raise click.UsageError(str(exc)) from None
    data_dir.mkdir(parents=True, exist_ok=True)
    fleet = eventloop.run(
        _fleet_main(
            phones=phones,
            data_dir=data_dir,
            mqtt_url=mqtt_url,
            amqp_url=amqp_url,
            link_kind=link_kind,
            db_url=db_url,
            ocsp_url=ocsp_url,
            config=config,
            key_pool=key_pool_size if key_pool else None,
            concurrency=concurrency,
            hold_only=hold_only,
            topic_root=topic_root,
            login=login,
        )
    )
    if hold_only:
        return
    fleet.save(data_dir)
    summary = fleet.summary()
    click.echo(format_results(fleet.results, summary))
    if report is not None:
        report.write_text(json.dumps(fleet.report(), indent=2, ensure_ascii=False))
    unexpected = [r for r in fleet.results if not expected(r, login=login)]
    for r in unexpected:
        click.echo(f"fleet: UNEXPECTED {r.device_id} ({r.profile}): {r.outcome} {r.reason}")
    sys.exit(1 if unexpected else 0)
