"""The JPKI applet: one implementation, personalised as a My Number Card or as a phone's.

Public interface exactly as DOMAIN.md §1 (what OpenSC's ``jpki`` driver sends works);
personalisation commands of our own design, only inside the SP-TSM's SCP03 session
(``CommandContext.secure``), specified in ``docs/personalisation.md``. Private keys never
leave the applet: not in a response, a log line or a repr. They are kept in the applet's
persisted state because that state *is* the secure element's storage (it must survive an
app reinstall).
"""

from __future__ import annotations

import base64
import enum
import json
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from device_sim.se.applet_api import CommandContext
from device_sim.se.pin import Pin
from protocol import jpki
from protocol.apdu import CommandAPDU, ResponseAPDU
from protocol.errors import JpkiError, StatusWord

log = structlog.get_logger(__name__)

RSA_BITS = 2048
RSA_EXPONENT = 65537


class Profile(enum.StrEnum):
    CARD = "card"
    PHONE = "phone"


TOKENS = {Profile.CARD: jpki.CARD_TOKEN, Profile.PHONE: jpki.PHONE_TOKEN}
CERT_FOR_KEY = {jpki.EF.AUTH_KEY: jpki.EF.AUTH_CERT, jpki.EF.SIGN_KEY: jpki.EF.SIGN_CERT}
KEY_FOR_CERT = {cert: key for key, cert in CERT_FOR_KEY.items()}

_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


# --- where new key pairs come from -------------------------------------------------------


class KeySource(Protocol):
    def new_key(self) -> rsa.RSAPrivateKey: ...


class GeneratedKeys:
    """Real RSA-2048 generation for every key pair (the default; functional tests)."""

    def new_key(self) -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=RSA_EXPONENT, key_size=RSA_BITS)


def default_data_dir() -> Path:
    configured = os.environ.get("JPKI_DATA_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jpki-mobile"


class PooledKeys:
    """PRE-GENERATED KEY POOL — for benchmarks and load tests only, never for real issuance.

    RSA-2048 generation costs tens of milliseconds of CPU; a load test of thousands of
    phones would measure key generation instead of the system. The pool is generated once,
    cached in the data directory, and its keys are handed out again and again, so two
    applets may hold the same key. Every pooled key is logged as such when drawn.
    """

    def __init__(
        self, size: int = 32, directory: Path | None = None, rng: random.Random | None = None
    ) -> None:
        if size < 1:
            raise ValueError("a key pool holds at least one key")
        self.path = (directory or default_data_dir()) / f"rsa{RSA_BITS}-key-pool-{size}.json"
        self._rng = rng or random.Random()
        self._keys = self._load_or_create(size)

    def _load_or_create(self, size: int) -> list[rsa.RSAPrivateKey]:
        try:
            keys = [_load_key(blob) for blob in json.loads(self.path.read_text())["keys"]]
            if len(keys) == size:
                return keys
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, JpkiError):
            log.warning("jpki_applet.key_pool_unreadable", pool=self.path.name)
        keys = [GeneratedKeys().new_key() for _ in range(size)]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Parallel test workers may build the same pool: each writes its own file, the
        # last rename wins, and every file renamed in is complete.
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        content = json.dumps({
            "warning": "pre-generated test keys for benchmarks; never use for real issuance",
            "keys": [_dump_key(k) for k in keys],
        })
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.write(content)
        tmp.replace(self.path)
        return keys

    def new_key(self) -> rsa.RSAPrivateKey:
        log.debug("jpki_applet.pooled_key_drawn", pool=str(self.path.name))
        return self._rng.choice(self._keys)


def _dump_key(key: rsa.RSAPrivateKey) -> str:
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return base64.b64encode(der).decode("ascii")


def _load_key(blob: str) -> rsa.RSAPrivateKey:
    # The blob is this simulator's own stored state (an applet's key or the key pool), never
    # input from outside: re-validating the RSA key would cost ~20 ms of CPU per key.
    key = serialization.load_der_private_key(base64.b64decode(blob), password=None,
                                             unsafe_skip_rsa_key_validation=True)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise JpkiError("stored applet key is not RSA")
    return key


def public_key_der(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> bytes:
    public = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _status(sw: int) -> ResponseAPDU:
    return ResponseAPDU.status(sw)


_OK = ResponseAPDU.status(StatusWord.OK)


# --- the applet ---------------------------------------------------------------------------


@dataclass(eq=False)
class JpkiApplet:
    profile: Profile
    key_source: KeySource = field(default_factory=GeneratedKeys, repr=False)
    aid: bytes = jpki.AID
    files: dict[int, bytes] = field(default_factory=dict, repr=False)
    pins: dict[int, Pin] = field(default_factory=dict, repr=False)
    _keys: dict[int, rsa.RSAPrivateKey] = field(default_factory=dict, repr=False)
    _owner: str | None = field(default=None, repr=False)
    # The public key of each key pair, made once per key (checked by identity, so a new or
    # wiped key never meets a stale one): WRITE CERTIFICATE compares the certified key with
    # it (a key comparison, cheaper than encoding the certified key's SubjectPublicKeyInfo).
    _public: dict[int, tuple[rsa.RSAPrivateKey, rsa.RSAPublicKey]] = field(
        default_factory=dict, repr=False
    )
    # Volatile (cleared by SELECT of the application): current EF, the PIN whose
    # successful VERIFY was the previous command, a certificate being chained in.
    _current_ef: int | None = field(default=None, repr=False)
    _just_verified: int | None = field(default=None, repr=False)
    _chain: tuple[int, bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.files[jpki.EF.TOKEN] = jpki.token_bytes(TOKENS[self.profile])
        for ef, rule in jpki.PIN_RULES.items():
            self.pins.setdefault(ef, Pin(rule))

    # --- Applet protocol -------------------------------------------------------------------

    def on_select(self) -> ResponseAPDU:
        self._logout()
        return _OK

    def on_deselect(self) -> None:
        self._logout()

    def holds_keys(self) -> bool:
        return bool(self._keys)

    def owner_reference(self) -> str | None:
        return self._owner

    def pin_status(self, pin_ef: int) -> jpki.PinStatus:
        return self.pins[pin_ef].status()

    def public_key(self, key_ef: int) -> rsa.RSAPublicKey | None:
        key = self._keys.get(key_ef)
        return key.public_key() if key else None

    def process(self, command: CommandAPDU, context: CommandContext) -> ResponseAPDU:
        just_verified, self._just_verified = self._just_verified, None
        if self._chain is not None and not (
            command.ins == jpki.INS_WRITE_CERTIFICATE and context.secure
        ):
            self._chain = None  # a chain is only continued by its next block
        try:
            if command.cla & 0x80 == 0:
                return self._process_iso(command, just_verified)
            if command.ins == jpki.INS_COMPUTE_DIGITAL_SIGNATURE:
                return self._compute_signature(command)
            handler = _PERSONALISATION.get(command.ins)
            if handler is None:
                return _status(StatusWord.INS_NOT_SUPPORTED)
            if not context.secure:
                log.info("jpki_applet.personalisation_refused", ins=f"{command.ins:02X}",
                         reason="outside the SP-TSM secure channel")
                return _status(StatusWord.SECURITY_STATUS_NOT_SATISFIED)
            return handler(self, command)
        except jpki.MalformedPersonalisationData:
            return _status(StatusWord.WRONG_DATA)

    # --- ISO commands (DOMAIN.md §1) ---------------------------------------------------------

    def _process_iso(self, command: CommandAPDU, just_verified: int | None) -> ResponseAPDU:
        if command.cla & 0xF0 != 0x00:
            return _status(StatusWord.CLA_NOT_SUPPORTED)
        if command.ins == jpki.INS_SELECT:
            return self._select(command)
        if command.ins == jpki.INS_READ_BINARY:
            return self._read_binary(command)
        if command.ins == jpki.INS_VERIFY:
            return self._verify(command)
        if command.ins == jpki.INS_CHANGE_REFERENCE_DATA:
            return self._change(command, just_verified)
        if command.ins == jpki.INS_RESET_RETRY_COUNTER:
            return self._reset_retry_counter(command)
        return _status(StatusWord.INS_NOT_SUPPORTED)

    def _select(self, command: CommandAPDU) -> ResponseAPDU:
        if command.p2 not in (0x0C, 0x00):
            return _status(StatusWord.INCORRECT_P1P2)
        if command.p1 == 0x04:
            # SELECT by AID reaching the applet itself (a card without a card manager).
            if command.data == self.aid:
                return self.on_select()
            return _status(StatusWord.FILE_NOT_FOUND)
        if command.p1 != 0x02:
            return _status(StatusWord.INCORRECT_P1P2)
        if len(command.data) != 2:
            return _status(StatusWord.WRONG_LENGTH)
        fid = int.from_bytes(command.data, "big")
        if fid in self.files or fid in self._keys or fid in self.pins:
            self._current_ef = fid
            return _OK
        return _status(StatusWord.FILE_NOT_FOUND)

    def _read_binary(self, command: CommandAPDU) -> ResponseAPDU:
        if command.p1 & 0x80:  # short EF identifier addressing: not supported
            return _status(StatusWord.INCORRECT_P1P2)
        if command.le is None:
            return _status(StatusWord.WRONG_LENGTH)
        ef = self._current_ef
        if ef is None or ef not in self.files:
            return _status(StatusWord.COMMAND_NOT_ALLOWED)
        if not self._may_read(ef):
            return _status(StatusWord.SECURITY_STATUS_NOT_SATISFIED)
        content = self.files[ef]
        offset = command.p1 << 8 | command.p2
        if offset >= len(content):
            return _status(StatusWord.WRONG_P1P2)
        # Fewer bytes than Le near the end of the EF are answered with 9000, as OpenSC expects.
        return ResponseAPDU(content[offset : offset + command.le], StatusWord.OK)

    def _may_read(self, ef: int) -> bool:
        if ef == jpki.EF.SIGN_CERT:
            return self.pins[jpki.EF.SIGN_PIN].verified
        if ef == jpki.EF.AUTH_CERT and self.profile is Profile.PHONE:
            return self.pins[jpki.EF.AUTH_PIN].verified
        return True

    def _current_pin(self) -> Pin | None:
        return self.pins.get(self._current_ef) if self._current_ef is not None else None

    def _verify(self, command: CommandAPDU) -> ResponseAPDU:
        if (command.p1, command.p2) != (0x00, 0x80):
            return _status(StatusWord.INCORRECT_P1P2)
        pin = self._current_pin()
        if pin is None:
            return _status(StatusWord.COMMAND_NOT_ALLOWED)
        if not command.data:
            return _status(pin.retries())
        sw = pin.verify(command.data)
        if sw == StatusWord.OK:
            self._just_verified = self._current_ef
        else:
            log.info("jpki_applet.verify_failed", pin_ef=f"{self._current_ef:04X}",
                     sw=f"{sw:04X}")
        return _status(sw)

    def _change(self, command: CommandAPDU, just_verified: int | None) -> ResponseAPDU:
        if (command.p1, command.p2) != (0x01, 0x80):
            return _status(StatusWord.INCORRECT_P1P2)
        pin = self._current_pin()
        if pin is None:
            return _status(StatusWord.COMMAND_NOT_ALLOWED)
        if not command.data:
            return _status(StatusWord.WRONG_LENGTH)
        if just_verified != self._current_ef:
            return _status(StatusWord.SECURITY_STATUS_NOT_SATISFIED)
        sw = pin.change(command.data)
        if sw == StatusWord.OK:
            log.info("jpki_applet.pin_changed", pin_ef=f"{self._current_ef:04X}")
        return _status(sw)

    def _reset_retry_counter(self, command: CommandAPDU) -> ResponseAPDU:
        if (command.p1, command.p2) != (0x00, 0x80):
            return _status(StatusWord.INCORRECT_P1P2)
        pin = self._current_pin()
        if pin is None:
            return _status(StatusWord.COMMAND_NOT_ALLOWED)
        puk_length = jpki.PUK_RULE.max_length
        if len(command.data) <= puk_length:
            return _status(StatusWord.WRONG_LENGTH)
        sw = pin.reset_with_puk(command.data[:puk_length], command.data[puk_length:])
        if sw == StatusWord.OK:
            log.info("jpki_applet.pin_set_with_puk", pin_ef=f"{self._current_ef:04X}")
        return _status(sw)

    def _compute_signature(self, command: CommandAPDU) -> ResponseAPDU:
        if (command.p1, command.p2) != (0x00, 0x80):
            return _status(StatusWord.INCORRECT_P1P2)
        key_ef = self._current_ef
        if key_ef not in jpki.KEY_EFS:
            return _status(StatusWord.CONDITIONS_NOT_SATISFIED)
        key = self._keys.get(key_ef)
        if key is None:
            return _status(StatusWord.REFERENCED_DATA_NOT_FOUND)
        if not self.pins[jpki.PIN_FOR_KEY[jpki.EF(key_ef)]].allows_signing:
            return _status(StatusWord.SECURITY_STATUS_NOT_SATISFIED)
        try:
            hash_name, digest = jpki.parse_digest_info(command.data)
        except jpki.InvalidDigestInfo:
            return _status(StatusWord.WRONG_DATA)
        signature = key.sign(digest, padding.PKCS1v15(), utils.Prehashed(_HASHES[hash_name]()))
        return ResponseAPDU(signature, StatusWord.OK)

    def _logout(self) -> None:
        for pin in self.pins.values():
            pin.logout()
        self._current_ef = None
        self._just_verified = None
        self._chain = None

    # --- personalisation (ours; the caller checked the secure channel) -----------------------

    def _generate_key_pair(self, command: CommandAPDU) -> ResponseAPDU:
        key_ef = command.p2
        if command.p1 != 0x00 or key_ef not in jpki.KEY_EFS:
            return _status(StatusWord.INCORRECT_P1P2)
        if not jpki.MIN_CHALLENGE <= len(command.data) <= jpki.MAX_CHALLENGE:
            return _status(StatusWord.WRONG_LENGTH)
        key = self.key_source.new_key()
        self._keys[key_ef] = key
        # A new key orphans the certificate of the old one.
        self.files.pop(CERT_FOR_KEY[jpki.EF(key_ef)], None)
        public = key.public_key()
        self._public[key_ef] = (key, public)
        spki = public_key_der(public)
        proof = key.sign(
            jpki.proof_message(key_ef, command.data, spki), padding.PKCS1v15(), hashes.SHA256()
        )
        log.info("jpki_applet.key_generated", key_ef=f"{key_ef:04X}")
        return ResponseAPDU(
            jpki.encode_tlv(jpki.TAG_PUBLIC_KEY, spki) + jpki.encode_tlv(jpki.TAG_PROOF, proof),
            StatusWord.OK,
        )

    def _write_certificate(self, command: CommandAPDU) -> ResponseAPDU:
        ef = command.p1 << 8 | command.p2
        if ef not in jpki.CERTIFICATE_EFS:
            return _status(StatusWord.INCORRECT_P1P2)
        so_far = b""
        if self._chain is not None and self._chain[0] == ef:
            so_far = self._chain[1]
        self._chain = None
        der = so_far + command.data
        if len(der) > jpki.MAX_CERTIFICATE:
            return _status(StatusWord.NOT_ENOUGH_MEMORY)
        if command.cla & jpki.CLA_CHAINING:
            self._chain = (ef, der)
            return _OK
        try:
            certificate = x509.load_der_x509_certificate(der)
        except ValueError:
            return _status(StatusWord.WRONG_DATA)
        key_ef = KEY_FOR_CERT.get(ef)  # EF is an IntEnum: its members are their int keys
        if key_ef is not None:
            key = self._keys.get(key_ef)
            if key is None:
                return _status(StatusWord.CONDITIONS_NOT_SATISFIED)
            known = self._public.get(key_ef)
            if known is None or known[0] is not key:
                known = self._public[key_ef] = (key, key.public_key())
            # Keys of another type or size compare unequal.
            if certificate.public_key() != known[1]:
                return _status(StatusWord.WRONG_DATA)
        self.files[ef] = der
        log.info("jpki_applet.certificate_written", ef=f"{ef:04X}", size=len(der))
        return _OK

    def _pin_for_p2(self, command: CommandAPDU) -> Pin | None:
        return self.pins.get(command.p2) if command.p1 == 0x00 else None

    def _set_temporary_pin(self, command: CommandAPDU) -> ResponseAPDU:
        pin = self.pins.get(command.p2)
        try:
            mode = jpki.TemporaryPinMode(command.p1)
        except ValueError:
            return _status(StatusWord.INCORRECT_P1P2)
        if pin is None:
            return _status(StatusWord.INCORRECT_P1P2)
        tlvs = jpki.decode_tlvs(command.data)
        if jpki.TAG_PIN not in tlvs or set(tlvs) - {jpki.TAG_PIN, jpki.TAG_PUK}:
            return _status(StatusWord.WRONG_DATA)
        sw = pin.set_temporary(tlvs[jpki.TAG_PIN], mode, tlvs.get(jpki.TAG_PUK, b""))
        if sw == StatusWord.OK:
            log.info("jpki_applet.temporary_pin_set", pin_ef=f"{command.p2:04X}",
                     mode=mode.name, state=pin.state.name)
        return _status(sw)

    def _block_pin(self, command: CommandAPDU) -> ResponseAPDU:
        return self._pin_admin(command, "block", Pin.block)

    def _unblock_pin(self, command: CommandAPDU) -> ResponseAPDU:
        return self._pin_admin(command, "unblock", Pin.unblock)

    def _transition_pin(self, command: CommandAPDU) -> ResponseAPDU:
        return self._pin_admin(command, "transition", Pin.transition)

    def _pin_admin(
        self, command: CommandAPDU, name: str, action: Callable[[Pin], int]
    ) -> ResponseAPDU:
        pin = self._pin_for_p2(command)
        if pin is None:
            return _status(StatusWord.INCORRECT_P1P2)
        sw = action(pin)
        log.info(f"jpki_applet.pin_{name}", pin_ef=f"{command.p2:04X}", sw=f"{sw:04X}",
                 state=pin.state.name)
        return _status(sw)

    def _get_pin_status(self, command: CommandAPDU) -> ResponseAPDU:
        pin = self._pin_for_p2(command)
        if pin is None:
            return _status(StatusWord.INCORRECT_P1P2)
        return ResponseAPDU(pin.status().to_bytes(), StatusWord.OK)

    def _wipe_keys(self, command: CommandAPDU) -> ResponseAPDU:
        if command.p1 != 0x00 or (command.p2 and command.p2 not in jpki.KEY_EFS):
            return _status(StatusWord.INCORRECT_P1P2)
        targets = [command.p2] if command.p2 else list(jpki.KEY_EFS)
        for key_ef in targets:
            self._keys.pop(key_ef, None)
            self.files.pop(CERT_FOR_KEY[jpki.EF(key_ef)], None)
            self.pins[jpki.PIN_FOR_KEY[jpki.EF(key_ef)]].clear()
        if not self._keys:
            self._owner = None
        log.info("jpki_applet.keys_wiped", key_efs=[f"{k:04X}" for k in targets])
        return _OK

    def _set_owner_reference(self, command: CommandAPDU) -> ResponseAPDU:
        if (command.p1, command.p2) != (0x00, 0x00):
            return _status(StatusWord.INCORRECT_P1P2)
        if not 1 <= len(command.data) <= jpki.MAX_OWNER_REFERENCE:
            return _status(StatusWord.WRONG_LENGTH)
        try:
            self._owner = command.data.decode("utf-8")
        except UnicodeDecodeError:
            return _status(StatusWord.WRONG_DATA)
        return _OK

    # --- persistence ----------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        return {
            "format": 1,
            "profile": self.profile.value,
            "aid": self.aid.hex(),
            "owner": self._owner,
            "files": {f"{ef:04X}": base64.b64encode(v).decode() for ef, v in self.files.items()},
            "keys": {f"{ef:04X}": _dump_key(k) for ef, k in self._keys.items()},
            "pins": {f"{ef:04X}": pin.to_state() for ef, pin in self.pins.items()},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], key_source: KeySource) -> JpkiApplet:
        if state.get("format") != 1:
            raise JpkiError("unknown JPKI applet state format")
        applet = cls(Profile(state["profile"]), key_source, bytes.fromhex(state["aid"]))
        applet.files = {int(ef, 16): base64.b64decode(v) for ef, v in state["files"].items()}
        applet._keys = {int(ef, 16): _load_key(k) for ef, k in state["keys"].items()}
        applet.pins = {
            int(ef, 16): Pin.from_state(jpki.PIN_RULES[jpki.EF(int(ef, 16))], p)
            for ef, p in state["pins"].items()
        }
        applet._owner = state["owner"]
        return applet


_PERSONALISATION: dict[int, Callable[[JpkiApplet, CommandAPDU], ResponseAPDU]] = {
    jpki.INS_GENERATE_KEY_PAIR: JpkiApplet._generate_key_pair,
    jpki.INS_WRITE_CERTIFICATE: JpkiApplet._write_certificate,
    jpki.INS_SET_TEMPORARY_PIN: JpkiApplet._set_temporary_pin,
    jpki.INS_BLOCK_PIN: JpkiApplet._block_pin,
    jpki.INS_UNBLOCK_PIN: JpkiApplet._unblock_pin,
    jpki.INS_TRANSITION_PIN: JpkiApplet._transition_pin,
    jpki.INS_GET_PIN_STATUS: JpkiApplet._get_pin_status,
    jpki.INS_WIPE_KEYS: JpkiApplet._wipe_keys,
    jpki.INS_SET_OWNER_REFERENCE: JpkiApplet._set_owner_reference,
}


@dataclass
class JpkiAppletFactory:
    """The applet's load file: INSTALL [for install] creates one; restore re-creates it.

    Install parameters are not used: the profile is a property of the load file (a phone's
    SE carries the phone profile).
    """

    profile: Profile = Profile.PHONE
    key_source: KeySource = field(default_factory=GeneratedKeys)

    def __call__(self, instance_aid: bytes, install_parameters: bytes) -> JpkiApplet:
        return JpkiApplet(self.profile, self.key_source, bytes(instance_aid))

    def restore(self, state: dict[str, Any]) -> JpkiApplet:
        return JpkiApplet.from_state(state, self.key_source)
