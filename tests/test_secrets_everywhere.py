"""No secret in any log line, exception text or repr, across the whole system.

One run of the embedded main job (``jpki run``'s machinery: orchestrator, SP-TSM, CA,
in-process phone link, a fleet) with a small mixed fleet — new, second-hand and reinstalled
phones, both certificates and one each, PIN options 3, 4 and 6, users who mistype their
codes — while everything that could carry a secret out is captured:

- every structlog line, rendered by the production chain at DEBUG, and every stdlib
  ``logging`` record at DEBUG (with its traceback);
- the text and repr of every ``JpkiError`` raised during the run, and whatever reaches the
  event loop's exception handler;
- the parking lots' reasons and the orchestrator's saga store (failure reasons, timelines);
- ``repr()`` of every project object reachable from the main holders of secrets (the fleet's
  apps, users, SEs, applets and PIN objects, the TSM worker and its key ring, the CA and its
  keystore, the orchestrator, every SCP03 session), sampled during the run and at its end.

Meanwhile the run's actual secrets are collected at their source: the users' PINs and
passwords (and their mistyped variants), the cards' PINs, the temporary PINs and PUKs the
TSM generated, every AES key made (SE static keys, SCP03 session keys, master keys), the
TSM and CA passphrases and the private numbers of every RSA key generated. None may appear
in the captured text as ASCII, hex (either case), base64 (either alphabet, any alignment),
a Python bytes literal, or — for digit codes — inside a VERIFY or CHANGE REFERENCE DATA
command in hex or base64.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import io
import logging
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric import rsa

import device_sim.fleet as fleet_mod
import jpki.run as run_mod
import workers.tsm.scripts as tsm_scripts
from device_sim.app import ScreenId, UserScript, _mistyped
from infra.bus import SERVICE_QUEUES
from infra.logging import configure_logging
from jpki.run import RunSettings, run_embedded
from protocol import scp03
from protocol.errors import JpkiError
from protocol.scp03._primitives import AesKey
from workers.ca.authority import CertificateAuthority

pytestmark = pytest.mark.e2e

PROJECT_PACKAGES = ("protocol", "device_sim", "workers", "orchestrator", "infra", "jpki")
SCP03_SESSION_CLASSES = (
    scp03.HostSession, scp03.AuthenticatedHost, scp03.OfflineHostSession,
    scp03.CardSecureChannel, scp03.CardAwaitingAuthentication, scp03.CardSession,
)
# Every screen where a code is typed: a user with typos gets each wrong once.
SLIPS = frozenset({ScreenId.CARD_PASSWORD, ScreenId.SET_AUTH_PIN, ScreenId.SET_SIGNING_PASSWORD,
                   ScreenId.ENTER_CODE, ScreenId.LOGIN_PIN})


# ---------------------------------------------------------------------------------------
# The scanner: one haystack, every secret in every encoding


@dataclass(frozen=True, slots=True)
class Leak:
    secret: str
    encoding: str
    where: str
    context: str


_DIGITS_ALONE = re.compile(r"(?<![0-9A-Za-z.+/_-])[0-9]+(?![0-9A-Za-z])")


def _base64_cores(raw: bytes) -> Iterator[tuple[str, str]]:
    """The characters of ``raw``'s base64 that ``raw`` alone decides, at each alignment
    (standard alphabet: the haystack's URL-safe characters are mapped to it)."""
    for align in range(3):
        encoded = base64.b64encode(b"\x00" * align + raw).decode()
        yield f"base64@{align}", encoded[-(-8 * align // 6):(8 * (align + len(raw))) // 6]


_ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def _distinct(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop repeats (object addresses aside): the DEBUG lines of a run repeat a lot."""
    seen: set[str] = set()
    kept = []
    for where, text in items:
        text = _ADDRESS.sub(" at 0x", text)
        if text not in seen:
            seen.add(text)
            kept.append((where, text))
    return kept


_URL_TO_STD = bytes.maketrans(b"-_", b"+/")


class Haystack:
    """Every captured text, joined once (as bytes: the fastest search), so each secret is one
    substring search per encoding."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        items = _distinct(items)
        self.wheres = [where for where, _ in items]
        self.starts: list[int] = []
        parts, offset = [], 0
        for _, text in items:
            raw = text.encode("utf-8", "backslashreplace")
            self.starts.append(offset)
            parts.append(raw)
            offset += len(raw) + 1
        self.raw = b"\n".join(parts)
        self.lower = self.raw.lower()
        # one base64 alphabet: URL-safe text searched with the standard one's needles
        self.base64 = self.raw.translate(_URL_TO_STD)
        text = self.raw.decode("utf-8", "replace")
        self.digits_alone = set(_DIGITS_ALONE.findall(text))

    def where(self, offset: int) -> tuple[str, str]:
        index = bisect.bisect_right(self.starts, offset) - 1
        context = self.raw[max(0, offset - 60):offset + 60].decode("utf-8", "replace")
        return self.wheres[index], context

    def find(self, label: str, secret: bytes | str | int) -> Leak | None:
        for encoding, needle, haystack in _needles(secret):
            if encoding == "digits":
                if needle in self.digits_alone:
                    pattern = re.compile(rb"(?<![0-9A-Za-z.+/_-])" + needle.encode()
                                         + rb"(?![0-9A-Za-z])")
                    match = pattern.search(self.raw)
                    return Leak(label, "ascii", *self.where(match.start() if match else 0))
                continue
            text = {"lower": self.lower, "base64": self.base64}.get(haystack, self.raw)
            offset = text.find(needle.encode())
            if offset >= 0:
                return Leak(label, encoding, *self.where(offset))
        return None


def _needles(secret: bytes | str | int) -> Iterator[tuple[str, str, str]]:
    """(encoding, needle, which haystack) for one secret."""
    if isinstance(secret, int):
        yield "decimal", str(secret), "text"
        yield "hex", format(secret, "x"), "lower"
        raw = secret.to_bytes((secret.bit_length() + 7) // 8, "big")
        for name, core in _base64_cores(raw):
            yield name, core, "base64"
        return
    if isinstance(secret, str):
        if secret.isdigit():
            yield "digits", secret, "text"
            # A short code inside a logged VERIFY or CHANGE REFERENCE DATA command, in hex or
            # base64: the whole command is the needle, since a 4-digit code alone would match
            # random bytes of decoded ids by chance.
            for header in (b"\x00\x20\x00\x80", b"\x00\x24\x01\x80"):
                apdu = header + bytes([len(secret)]) + secret.encode()
                yield "apdu hex", apdu.hex(), "lower"
                for name, core in _base64_cores(apdu):
                    yield f"apdu {name}", core, "base64"
            return
        yield "ascii", secret, "text"
        raw = secret.encode()
    else:
        raw = secret
        yield "bytes literal", repr(raw)[2:-1], "text"
    yield "hex", raw.hex(), "lower"
    for name, core in _base64_cores(raw):
        yield name, core, "base64"


def scan(items: list[tuple[str, str]], secrets: dict[str, bytes | str | int]) -> list[Leak]:
    haystack = Haystack(items)
    return [leak for label, value in secrets.items()
            if (leak := haystack.find(label, value)) is not None]


def test_the_scanner_finds_each_encoding_and_not_lookalikes() -> None:
    key = bytes(range(7, 23))
    number = 0xC0FFEE_1234_5678_9ABC_DEF0_1122_3344
    secrets: dict[str, bytes | str | int] = {
        "pin": "4821", "password": "QZ7XK2MW9P", "key": key, "number": number}
    verify_apdu = (bytes.fromhex("0020008004") + b"4821").hex().upper()
    for leaked, label in (
        ("pin=4821", "pin"), (f"apdu={verify_apdu}", "pin"),
        (f"apdu={base64.b64encode(b'xx' + bytes.fromhex('0020008004') + b'4821').decode()}",
         "pin"),
        ("QZ7XK2MW9P", "password"), (b"QZ7XK2MW9P".hex().upper(), "password"),
        (repr(key), "key"), (key.hex(), "key"), (key.hex().upper(), "key"),
        (base64.b64encode(b"a" + key).decode(), "key"),
        (base64.urlsafe_b64encode(b"ab" + key).decode(), "key"),
        (str(number), "number"), (hex(number), "number"),
    ):
        found = scan([("line", f"event=x value={leaked} more")], secrets)
        assert [leak.secret for leak in found] == [label], leaked
    lookalikes = ("t=1764443711.48213 n=948217 at 2026-11-29T19:48:21Z "
                  + base64.b64encode(b"\x17\x0d261129194821Z").decode())
    assert scan([("line", lookalikes)], secrets) == []


# ---------------------------------------------------------------------------------------
# What the run captures and collects


@dataclass
class Capture:
    lines: list[tuple[str, str]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    secrets: dict[str, bytes | str | int] = field(default_factory=dict)
    roots: dict[str, Any] = field(default_factory=dict)
    sessions: list[Any] = field(default_factory=list)
    reprs: dict[int, tuple[str, str]] = field(default_factory=dict)  # id → (where, repr)
    aes_keys: int = 0
    rsa_keys: int = 0
    temporary: int = 0
    cards: int = 0

    def add_secret(self, label: str, value: bytes | str | int | None) -> None:
        if value:
            self.secrets[label] = value

    def add_user_secret(self, label: str, value: str) -> None:
        self.add_secret(label, value)
        self.add_secret(f"{label} (mistyped)", _mistyped(value))

    def walk(self, where: str, root: Any, limit: int = 200_000) -> None:
        """repr() of every project object reachable from ``root``."""
        seen: set[int] = set()
        stack = [root]
        while stack and len(seen) < limit:
            obj = stack.pop()
            if id(obj) in seen or isinstance(obj, str | bytes | bytearray | int | float | bool):
                continue
            seen.add(id(obj))
            if isinstance(obj, dict):
                stack.extend(obj.keys())
                stack.extend(obj.values())
                continue
            if isinstance(obj, list | tuple | set | frozenset):
                stack.extend(obj)
                continue
            module = type(obj).__module__ or ""
            if module.split(".")[0] not in PROJECT_PACKAGES:
                continue
            with contextlib.suppress(Exception):
                text = repr(obj)
                self.reprs[hash((type(obj).__qualname__, text))] = (
                    f"repr:{type(obj).__qualname__} (from {where})", text)
            attributes = getattr(obj, "__dict__", {})
            stack.extend(attributes.values())
            for cls in type(obj).__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    with contextlib.suppress(AttributeError):
                        stack.append(getattr(obj, slot))

    def walk_all(self) -> None:
        for name, root in self.roots.items():
            self.walk(name, root)
        for session in self.sessions:
            self.walk("scp03 session", session)


class _LineSink(io.TextIOBase):
    def __init__(self, capture: Capture) -> None:
        self.capture = capture

    def write(self, text: str) -> int:
        if text.strip():
            self.capture.lines.append(("structlog", text))
        return len(text)


class _RecordHandler(logging.Handler):
    def __init__(self, capture: Capture) -> None:
        super().__init__(logging.DEBUG)
        self.capture = capture
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.capture.lines.append((f"logging:{record.name}", self.format(record)))


def _instrument(monkeypatch: pytest.MonkeyPatch, capture: Capture) -> None:
    """Record the secrets where they are made, and the objects that hold them."""
    original_aes_init = AesKey.__init__

    def aes_init(self: AesKey, key: bytes) -> None:
        original_aes_init(self, key)
        capture.aes_keys += 1
        capture.add_secret(f"aes key {capture.aes_keys}", bytes(key))

    monkeypatch.setattr(AesKey, "__init__", aes_init)

    original_generate = rsa.generate_private_key

    def generate(*args: Any, **kwargs: Any) -> rsa.RSAPrivateKey:
        key = original_generate(*args, **kwargs)
        capture.rsa_keys += 1
        numbers = key.private_numbers()
        for name in ("d", "p", "q"):
            capture.add_secret(f"rsa key {capture.rsa_keys} {name}", getattr(numbers, name))
        return key

    monkeypatch.setattr(rsa, "generate_private_key", generate)

    original_temporary = tsm_scripts.new_temporary_pin

    def temporary(*args: Any, **kwargs: Any) -> Any:
        value = original_temporary(*args, **kwargs)
        capture.temporary += 1
        capture.add_user_secret(f"temporary pin {capture.temporary}", value.pin)
        if value.puk:
            capture.add_user_secret(f"puk {capture.temporary}", value.puk)
        return value

    monkeypatch.setattr(tsm_scripts, "new_temporary_pin", temporary)

    original_card = fleet_mod.manufacture_card

    def manufacture_card(*args: Any, auth_pin: str, sign_password: str, **kwargs: Any) -> Any:
        capture.cards += 1
        capture.add_user_secret(f"card {capture.cards} auth pin", auth_pin)
        capture.add_user_secret(f"card {capture.cards} password", sign_password)
        return original_card(*args, auth_pin=auth_pin, sign_password=sign_password, **kwargs)

    monkeypatch.setattr(fleet_mod, "manufacture_card", manufacture_card)

    original_script = fleet_mod.Person.script

    def script(self: Any, certificates: str, pin_option: Any, typos: bool) -> UserScript:
        made = original_script(self, certificates, pin_option, typos)
        if typos:
            made = UserScript(card_password=made.card_password, auth_pin=made.auth_pin,
                              signing_password=made.signing_password,
                              certificates=made.certificates, pin_option=made.pin_option,
                              typos=SLIPS)
        return made

    monkeypatch.setattr(fleet_mod.Person, "script", script)

    original_error_init = JpkiError.__init__

    def error_init(self: JpkiError, *args: Any, **kwargs: Any) -> None:
        original_error_init(self, *args, **kwargs)
        capture.errors.append(self)

    monkeypatch.setattr(JpkiError, "__init__", error_init)

    for cls in SCP03_SESSION_CLASSES:
        original = cls.__init__

        def session_init(self: Any, *args: Any, __original: Any = original, **kwargs: Any) -> None:
            __original(self, *args, **kwargs)
            capture.sessions.append(self)

        monkeypatch.setattr(cls, "__init__", session_init)

    original_open = CertificateAuthority.open.__func__  # type: ignore[attr-defined]

    async def open_ca(cls: type, *args: Any, **kwargs: Any) -> CertificateAuthority:
        ca = await original_open(cls, *args, **kwargs)
        capture.roots["ca"] = ca
        return ca

    monkeypatch.setattr(CertificateAuthority, "open", classmethod(open_ca))

    original_tsm = run_mod.make_tsm_worker

    async def make_tsm_worker(*args: Any) -> Any:
        worker = await original_tsm(*args)
        capture.roots["tsm worker"] = worker
        return worker

    monkeypatch.setattr(run_mod, "make_tsm_worker", make_tsm_worker)

    original_orchestrator = run_mod.Orchestrator

    def orchestrator(*args: Any, **kwargs: Any) -> Any:
        made = original_orchestrator(*args, **kwargs)
        capture.roots["orchestrator"] = made
        return made

    monkeypatch.setattr(run_mod, "Orchestrator", orchestrator)


async def _sample_reprs(capture: Capture, fleet: fleet_mod.Fleet) -> None:
    """Secrets sit in an app only for a while: look at the phones' objects during the run."""
    while True:
        await asyncio.sleep(0.2)
        capture.walk("fleet", fleet)
        for session in capture.sessions:
            capture.walk("scp03 session", session)


def _store_texts(data_dir: Path) -> Iterator[tuple[str, str]]:
    """Every text and blob in the orchestrator's store: saga data, failure reasons, timelines."""
    with contextlib.closing(sqlite3.connect(data_dir / "orchestrator.db")) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            for row in db.execute(f'SELECT * FROM "{table}"'):  # noqa: S608 - names from sqlite
                for value in row:
                    if isinstance(value, bytes):
                        value = value.decode("utf-8", "replace")
                    if isinstance(value, str):
                        yield f"orchestrator.db:{table}", value


async def test_no_secret_in_any_log_line_exception_or_repr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    capture = Capture()
    configure_logging("secrets-test", level="DEBUG", pretty=False, stream=_LineSink(capture))
    handler = _RecordHandler(capture)
    root_logger = logging.getLogger()
    previous_level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.DEBUG)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(
        lambda _loop, context: capture.lines.append(("event loop", repr(context))))
    _instrument(monkeypatch, capture)
    transports: list[Any] = []
    sampler: list[asyncio.Task[None]] = []

    async def keep_transport(transport: Any) -> None:
        transports.append(transport)

    def on_fleet(fleet: fleet_mod.Fleet) -> None:
        capture.roots["fleet"] = fleet
        for index, phone in enumerate(fleet.phones):
            phone.typos = index % 2 == 0  # every other user slips on every code once
        sampler.append(asyncio.get_running_loop().create_task(_sample_reprs(capture, fleet)))

    settings = RunSettings(
        phones=6, data_dir=tmp_path, seed=71, key_pool=8,
        profile_mix="new=4,second_hand=1,reinstalled=1",
        certificate_mix="both=4,auth=1,sign=1", pin_option_mix="3=1,4=1,6=1",
    )
    original_run_stack = run_mod.run_stack

    async def run_stack(*args: Any, **kwargs: Any) -> Any:
        return await original_run_stack(*args, on_transport=keep_transport, on_fleet=on_fleet,
                                        **kwargs)

    monkeypatch.setattr(run_mod, "run_stack", run_stack)
    try:
        outcome = await run_embedded(settings)
    finally:
        for task in sampler:
            task.cancel()
        root_logger.removeHandler(handler)
        root_logger.setLevel(previous_level)
        loop.set_exception_handler(None)

    # the run did what it should: every phone issued, with options 3, 4 and 6 and typos
    endings = [(p["outcome"], p["reason"]) for p in outcome.phones]
    assert {outcome for outcome, _ in endings} == {"issued"}, endings
    assert {p["pin_option"] for p in outcome.phones} == {3, 4, 6}
    assert outcome.audit == []

    capture.walk_all()
    fleet = capture.roots["fleet"]
    keys = run_mod.tsm_key_ring(tmp_path)
    for version, master in keys.versions.items():
        for name in ("enc", "mac", "dek"):
            capture.add_secret(f"master key v{version} {name}", getattr(master, name))
    for phone in fleet.phones:
        for who, person in (("owner", phone.owner), ("previous", phone.previous_owner)):
            if person is None:
                continue
            for name in ("card_password", "auth_pin", "signing_password"):
                capture.add_user_secret(f"{phone.device_id} {who} {name}", getattr(person, name))
        static = keys.current_keys.static_keys_for(phone.se.identity.kdd)
        for name in ("enc", "mac", "dek"):
            capture.add_secret(f"{phone.device_id} SE static {name}", getattr(static, name))
    for name in ("ca", "tsm"):
        capture.add_secret(f"{name} passphrase",
                           (tmp_path / "secrets" / f"{name}.passphrase").read_text().strip())

    texts = list(capture.lines)
    texts += [(f"exception:{type(e).__name__}", f"{e}\n{e!r}\n{e.args!r}")
              for e in capture.errors]
    for transport in transports:
        for queue in SERVICE_QUEUES:
            with contextlib.suppress(Exception):
                for parked in await transport.parked(queue, limit=10_000):
                    texts.append((f"parked:{queue}", parked.reason))
    texts += list(_store_texts(tmp_path))
    texts += list(capture.reprs.values())

    # it must be able to fail: it saw the run and collected the secrets of every kind
    assert sum(where == "structlog" for where, _ in texts) > 200
    assert any(where.startswith("logging:") for where, _ in texts)
    assert len(capture.errors) > 0  # mistyped codes are refused with typed errors
    assert any("VirtualUser" in where for where, _ in capture.reprs.values())
    assert capture.sessions and capture.aes_keys > 3 * len(fleet.phones)
    assert capture.rsa_keys >= 8  # the key pool's (the applets' keys) and the CA's
    assert capture.temporary > 0
    assert any("puk" in label for label in capture.secrets)
    assert any("passphrase" in label for label in capture.secrets)

    leaks = scan(texts, capture.secrets)
    assert leaks == [], "\n".join(
        f"{leak.secret} as {leak.encoding} in {leak.where}: {leak.context!r}"
        for leak in leaks[:10])
    structlog.reset_defaults()
