"""A GlobalPlatform card manager (GP Card Specification v2.3.1, Amendment D for SCP03).

Sans-I/O: ``CardManager.process`` takes one command APDU and returns one response APDU.
It holds the registry (security domains, executable load files, application instances),
the card and application life cycles, the security domains' SCP03 key sets and sequence
counters, and routes commands to the selected applet, unwrapping and wrapping them in the
secure channel of the applet's security domain as ``applet_api.py`` describes.

Only the basic logical channel is supported. Every malformed command gets a status word;
nothing raises out of ``process``.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from device_sim.se.applet_api import Applet, AppletFactory, CommandContext
from protocol import tlv
from protocol.apdu import CommandAPDU, ResponseAPDU
from protocol.errors import (
    JpkiError,
    MalformedTLV,
    SecureChannelError,
    StatusWord,
)
from protocol.scp03 import key_check_value
from protocol.scp03.card import CardAwaitingAuthentication, CardSecureChannel, CardSession
from protocol.scp03.keyblock import KeyBlockError, parse_put_key_data
from protocol.scp03.keys import S8, StaticKeys

log = structlog.get_logger(__name__)

ISD_AID = bytes.fromhex("A000000151000000")  # GP-registered ISD AID
GET_STATUS_CHUNK = 0xF0  # response data per GET STATUS page before 6310 "more data"

SW_MORE_DATA = 0x6310
SW_SELECTION_FAILED = 0x6999
C_MAC = 0x01  # security level bit (Amd D §5.1): card management needs at least C-MAC

_OUTSIDE_SESSION = CommandContext(secure=False)


class CardLifeCycle(enum.IntEnum):
    """GP §5.1.1 card life cycle states (ISD life cycle coding)."""

    OP_READY = 0x01
    INITIALIZED = 0x07
    SECURED = 0x0F
    CARD_LOCKED = 0x7F
    TERMINATED = 0xFF


class AppLifeCycle(enum.IntEnum):
    """GP §5.3 application and security domain states; LOCKED is b8 over the prior state."""

    LOADED = 0x01  # executable load files
    INSTALLED = 0x03
    SELECTABLE = 0x07
    PERSONALIZED = 0x0F  # security domains
    LOCKED_BIT = 0x80


class ChallengeMode(enum.StrEnum):
    PSEUDO_RANDOM = "pseudo-random"  # i = 0x70: challenge from Key-ENC, counter and SD AID
    RANDOM = "random"  # i = 0x60: fresh random challenge, no counter in the response


class Privilege(enum.IntFlag):
    """First two privilege bytes (GP §6.6.1), encoded big-endian in a 3-byte C5."""

    SECURITY_DOMAIN = 0x800000
    DELEGATED_MANAGEMENT = 0x200000
    CARD_LOCK = 0x100000
    CARD_TERMINATE = 0x080000
    CARD_RESET = 0x040000
    CVM_MANAGEMENT = 0x020000
    TRUSTED_PATH = 0x008000
    AUTHORIZED_MANAGEMENT = 0x004000
    GLOBAL_DELETE = 0x001000
    GLOBAL_LOCK = 0x000800
    GLOBAL_REGISTRY = 0x000400


ISD_PRIVILEGES = (
    Privilege.SECURITY_DOMAIN
    | Privilege.CARD_LOCK
    | Privilege.CARD_TERMINATE
    | Privilege.CARD_RESET
    | Privilege.CVM_MANAGEMENT
    | Privilege.AUTHORIZED_MANAGEMENT
    | Privilege.GLOBAL_DELETE
    | Privilege.GLOBAL_LOCK
    | Privilege.GLOBAL_REGISTRY
)
SP_SD_PRIVILEGES = Privilege.SECURITY_DOMAIN | Privilege.AUTHORIZED_MANAGEMENT

# Proprietary GET STATUS tags (inside E3): does the applet hold a private key, and whose.
# They let the SP-TSM decide the phase-2 clean-up from one protected GET STATUS.
TAG_HOLDS_KEYS = 0xDF70
TAG_OWNER_REFERENCE = 0xDF71


class CardManagerError(JpkiError):
    """A card-management command refused with a status word (never escapes ``process``)."""

    remote_fault = True

    def __init__(self, sw: int, reason: str) -> None:
        self.sw = sw
        super().__init__(f"{reason} ({sw:04X})")


def _refuse(sw: int, reason: str) -> CardManagerError:
    return CardManagerError(sw, reason)


@dataclass(slots=True)
class KeySet:
    """One SCP03 key set of a security domain (AES-128/192/256)."""

    kvn: int
    enc: bytes = field(repr=False)
    mac: bytes = field(repr=False)
    dek: bytes = field(repr=False)
    # The keys as loaded into the crypto engine, made once (cipher contexts are not free).
    _static: StaticKeys | None = field(default=None, repr=False, compare=False)

    def static_keys(self) -> StaticKeys:
        if self._static is None:
            self._static = StaticKeys(self.enc, self.mac, self.dek)
        return self._static

    def to_state(self) -> dict[str, Any]:
        return {
            "kvn": self.kvn, "enc": self.enc.hex(), "mac": self.mac.hex(), "dek": self.dek.hex()
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> KeySet:
        return cls(
            int(state["kvn"]),
            bytes.fromhex(state["enc"]),
            bytes.fromhex(state["mac"]),
            bytes.fromhex(state["dek"]),
        )


@dataclass(slots=True)
class SecurityDomain:
    aid: bytes
    key_sets: dict[int, KeySet]
    privileges: int
    challenge_mode: ChallengeMode = ChallengeMode.PSEUDO_RANDOM
    sequence_counter: int = 0  # value used by the last INITIALIZE UPDATE
    s_mode: int = S8
    life_cycle: int = AppLifeCycle.PERSONALIZED
    associated_sd: bytes | None = None  # None for the ISD

    def to_state(self) -> dict[str, Any]:
        return {
            "aid": self.aid.hex(),
            "key_sets": [k.to_state() for k in self.key_sets.values()],
            "privileges": self.privileges,
            "challenge_mode": self.challenge_mode.value,
            "sequence_counter": self.sequence_counter,
            "s_mode": self.s_mode,
            "life_cycle": self.life_cycle,
            "associated_sd": self.associated_sd.hex() if self.associated_sd else None,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SecurityDomain:
        key_sets = [KeySet.from_state(k) for k in state["key_sets"]]
        return cls(
            aid=bytes.fromhex(state["aid"]),
            key_sets={k.kvn: k for k in key_sets},
            privileges=int(state["privileges"]),
            challenge_mode=ChallengeMode(state["challenge_mode"]),
            sequence_counter=int(state["sequence_counter"]),
            s_mode=int(state["s_mode"]),
            life_cycle=int(state["life_cycle"]),
            associated_sd=bytes.fromhex(state["associated_sd"]) if state["associated_sd"] else None,
        )


@dataclass(frozen=True, slots=True)
class LoadFile:
    """An executable load file in ROM: its modules and the factory that instantiates them."""

    aid: bytes
    modules: tuple[bytes, ...]
    factory: AppletFactory = field(repr=False, compare=False)


@dataclass(slots=True)
class Application:
    aid: bytes
    elf_aid: bytes
    module_aid: bytes
    privileges: int
    life_cycle: int
    sd_aid: bytes
    applet: Applet = field(repr=False)


@dataclass(frozen=True, slots=True)
class CardIdentity:
    """What the card tells about itself (GET DATA): CIN, IIN, KDD and CPLC."""

    cin: bytes
    iin: bytes
    kdd: bytes
    cplc: bytes

    def to_state(self) -> dict[str, str]:
        return {k: getattr(self, k).hex() for k in ("cin", "iin", "kdd", "cplc")}

    @classmethod
    def from_state(cls, state: Mapping[str, str]) -> CardIdentity:
        return cls(*(bytes.fromhex(state[k]) for k in ("cin", "iin", "kdd", "cplc")))


def cplc_for(serial: bytes) -> bytes:
    """A 42-byte CPLC (GP §H.4) for a simulated chip whose IC serial comes from ``serial``."""
    ic_serial = (serial + bytes(4))[:4]
    fields = (
        bytes.fromhex("4A50"),  # IC fabricator "JP"
        bytes.fromhex("0001"),  # IC type
        bytes.fromhex("5345"),  # OS identifier "SE"
        bytes.fromhex("6001"),  # OS release date
        bytes.fromhex("0100"),  # OS release level
        bytes.fromhex("6001"),  # IC fabrication date
        ic_serial,
        bytes(2),  # IC batch identifier
        bytes(2),  # module fabricator
        bytes(2),  # module packaging date
        bytes(2),  # ICC manufacturer
        bytes(2),  # IC embedding date
        bytes(2),  # pre-personaliser
        bytes(2),  # pre-personalisation date
        bytes(4),  # pre-personalisation equipment
        bytes(2),  # personaliser
        bytes(2),  # personalisation date
        bytes(4),  # personalisation equipment
    )
    return b"".join(fields)


@dataclass(slots=True)
class _OpenChannel:
    """The SCP03 session of one security domain on the basic logical channel."""

    sd: SecurityDomain
    kvn: int
    pending: CardAwaitingAuthentication | None
    session: CardSession | None = None
    context: CommandContext | None = None  # what the applet is told, once authenticated
    security_level: int = 0  # the session's, as a plain int (read for every command)


@dataclass(slots=True)
class _Selection:
    aid: bytes
    sd: SecurityDomain | None  # set when a security domain itself is selected
    app: Application | None  # set when an applet is selected


class CardManager:
    """The OPEN: registry, life cycles and the SCP03 channel of the selected application."""

    def __init__(
        self,
        identity: CardIdentity,
        security_domains: list[SecurityDomain],
        load_files: list[LoadFile],
        *,
        life_cycle: CardLifeCycle = CardLifeCycle.SECURED,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not security_domains or security_domains[0].associated_sd is not None:
            raise ValueError("the first security domain must be the issuer security domain")
        self.identity = identity
        self.life_cycle = life_cycle
        self.domains: dict[bytes, SecurityDomain] = {sd.aid: sd for sd in security_domains}
        self.isd = security_domains[0]
        self.load_files: dict[bytes, LoadFile] = {lf.aid: lf for lf in load_files}
        self.applications: dict[bytes, Application] = {}
        self._random = random_bytes
        self._selected = _Selection(self.isd.aid, self.isd, None)
        self._channel: _OpenChannel | None = None
        self._status_pages: list[bytes] = []
        self._personalizing: bytes | None = None  # target of INSTALL [for personalization]

    # ------------------------------------------------------------------ entry point

    def reset(self) -> None:
        """Power cycle / card reset: the ISD is selected, no session is open."""
        self._deselect()
        self._selected = _Selection(self.isd.aid, self.isd, None)

    def process(self, command: CommandAPDU) -> ResponseAPDU:
        try:
            return self._process(command)
        except CardManagerError as exc:
            if exc.sw == StatusWord.SECURITY_STATUS_NOT_SATISFIED:
                self._channel = None  # GP §10.x: a security failure ends the session
            log.debug("card_manager.refused", ins=f"{command.ins:02X}", sw=f"{exc.sw:04X}")
            return ResponseAPDU.status(exc.sw)
        except MalformedTLV:
            return self._wrap(ResponseAPDU.status(StatusWord.WRONG_DATA))
        except SecureChannelError as exc:
            self._channel = None
            log.info("card_manager.secure_channel_failed", error=type(exc).__name__)
            return ResponseAPDU.status(StatusWord.SECURITY_STATUS_NOT_SATISFIED)

    def _process(self, command: CommandAPDU) -> ResponseAPDU:
        if command.cla & 0x03 or (command.cla & 0x40):
            raise _refuse(StatusWord.LOGICAL_CHANNEL_NOT_SUPPORTED, "logical channel")
        if self.life_cycle == CardLifeCycle.TERMINATED:
            # GP §5.1.1.5: a terminated card answers GET DATA and nothing else.
            self._channel = None
            if command.ins != 0xCA or self._selected.sd is None:
                raise _refuse(StatusWord.CONDITIONS_NOT_SATISFIED, "card terminated")
            return self._get_data(command)
        if command.ins == 0xA4 and command.cla & 0x80 == 0:
            return self._select(command)
        if command.ins == 0x50 and command.cla & 0x80:
            return self._initialize_update(command)
        if command.ins == 0x82 and command.cla & 0x80:
            return self._external_authenticate(command)
        if command.ins == 0xCA and self._selected.sd is not None and self._channel is None:
            return self._get_data(command)  # GET DATA is free outside a session (GP §11.3)
        plain = self._unwrap(command)
        if self._selected.app is not None:
            response = self._selected.app.applet.process(plain, self._applet_context())
        else:
            response = self._card_management(plain)
        return self._wrap(response)

    # ------------------------------------------------------------------ secure channel

    def _unwrap(self, command: CommandAPDU) -> CommandAPDU:
        channel = self._channel
        if channel is None:
            if command.cla & 0x04:
                raise _refuse(StatusWord.SECURITY_STATUS_NOT_SATISFIED, "SM without a session")
            return command
        if channel.session is None:
            raise _refuse(StatusWord.SECURITY_STATUS_NOT_SATISFIED, "session not authenticated")
        if channel.security_level & C_MAC and not command.cla & 0x04:
            raise _refuse(StatusWord.SECURITY_STATUS_NOT_SATISFIED, "C-MAC required")
        return channel.session.unwrap_command(command)

    def _wrap(self, response: ResponseAPDU) -> ResponseAPDU:
        channel = self._channel
        if channel is None or channel.session is None:
            return response
        return channel.session.wrap_response(response)

    def _applet_context(self) -> CommandContext:
        channel = self._channel
        if channel is None or channel.context is None:
            return _OUTSIDE_SESSION
        return channel.context

    def _channel_domain(self) -> SecurityDomain:
        selected = self._selected
        if selected.sd is not None:
            return selected.sd
        assert selected.app is not None  # one of the two is always set
        return self.domains[selected.app.sd_aid]

    def _initialize_update(self, command: CommandAPDU) -> ResponseAPDU:
        self._channel = None
        sd = self._channel_domain()
        key_set = self._key_set(sd, command.p1)
        secure_channel = CardSecureChannel(
            kdd=self.identity.kdd,
            sd_aid=sd.aid,
            sequence_counter=sd.sequence_counter,
            s_modes=(sd.s_mode,),
            pseudo_random=sd.challenge_mode is ChallengeMode.PSEUDO_RANDOM,
            random=self._random,
        )
        try:
            response, pending = secure_channel.initialize_update(
                command, key_set.static_keys(), key_set.kvn
            )
        except SecureChannelError:
            raise _refuse(StatusWord.WRONG_DATA, "INITIALIZE UPDATE refused") from None
        # Amd D §6.2.2.1: the counter moves on every challenge, even an unused one.
        sd.sequence_counter = secure_channel.sequence_counter
        self._channel = _OpenChannel(sd, key_set.kvn, pending)
        return response

    def _external_authenticate(self, command: CommandAPDU) -> ResponseAPDU:
        channel = self._channel
        if channel is None or channel.pending is None:
            self._channel = None
            raise _refuse(StatusWord.CONDITIONS_NOT_SATISFIED, "EXTERNAL AUTHENTICATE out of order")
        pending, channel.pending = channel.pending, None
        channel.session = pending.external_authenticate(command)  # raises: bad cryptogram
        channel.security_level = int(channel.session.security_level)
        channel.context = CommandContext(secure=True, security_level=channel.security_level)
        log.debug("card_manager.session_open", level=f"{channel.security_level:02X}")
        return ResponseAPDU.status(StatusWord.OK)

    @staticmethod
    def _key_set(sd: SecurityDomain, kvn: int) -> KeySet:
        if kvn == 0:  # "first available key set" (GP §11.11.2.1)
            return sd.key_sets[min(sd.key_sets)]
        try:
            return sd.key_sets[kvn]
        except KeyError:
            raise _refuse(StatusWord.REFERENCED_DATA_NOT_FOUND, "no such key version") from None

    # ------------------------------------------------------------------ selection

    def _deselect(self) -> None:
        self._channel = None
        self._status_pages = []
        self._personalizing = None
        if self._selected.app is not None:
            self._selected.app.applet.on_deselect()

    def _select(self, command: CommandAPDU) -> ResponseAPDU:
        if command.p1 != 0x04:
            if self._selected.app is not None:  # SELECT EF and friends belong to the applet
                plain = self._unwrap(command)
                applet = self._selected.app.applet
                return self._wrap(applet.process(plain, self._applet_context()))
            raise _refuse(StatusWord.INCORRECT_P1P2, "only SELECT by AID here")
        aid = command.data or self.isd.aid
        if self.life_cycle == CardLifeCycle.CARD_LOCKED and aid != self.isd.aid:
            raise _refuse(SW_SELECTION_FAILED, "card locked")
        sd = self.domains.get(aid)
        app = self.applications.get(aid)
        if sd is None and app is None:
            matches = [a for a in self.applications.values() if a.aid.startswith(aid)]
            app = matches[0] if matches else None
            if app is None:
                raise _refuse(StatusWord.FILE_NOT_FOUND, "no such application")
        if app is not None and (
            app.life_cycle & AppLifeCycle.LOCKED_BIT or app.life_cycle < AppLifeCycle.SELECTABLE
        ):
            raise _refuse(SW_SELECTION_FAILED, "application not selectable")
        if sd is not None and sd.life_cycle & AppLifeCycle.LOCKED_BIT:
            raise _refuse(SW_SELECTION_FAILED, "security domain locked")
        self._deselect()
        if app is not None:
            self._selected = _Selection(app.aid, None, app)
            return app.applet.on_select()
        assert sd is not None
        self._selected = _Selection(sd.aid, sd, None)
        fci = tlv.encode(0x6F, tlv.encode(0x84, sd.aid) + tlv.encode(0xA5, tlv.encode(0x9F6E, b"")))
        return ResponseAPDU(fci, StatusWord.OK)

    # ------------------------------------------------------------------ card management

    def _card_management(self, command: CommandAPDU) -> ResponseAPDU:
        sd = self._selected.sd
        assert sd is not None
        handlers = {
            0xE6: self._install,
            0xE4: self._delete,
            0xF2: self._get_status,
            0xF0: self._set_status,
            0xD8: self._put_key,
            0xE2: self._store_data,
            0xCA: lambda _sd, get_data: self._get_data(get_data),
        }
        handler = handlers.get(command.ins)
        if handler is None:
            raise _refuse(StatusWord.INS_NOT_SUPPORTED, "instruction")
        if command.cla & 0x80 == 0 and command.ins != 0xCA:
            raise _refuse(StatusWord.CLA_NOT_SUPPORTED, "GP commands use CLA 80/84")
        if command.ins != 0xCA:
            channel = self._channel
            if channel is None or channel.session is None:
                raise _refuse(StatusWord.SECURITY_STATUS_NOT_SATISFIED, "no secure channel")
            if not channel.security_level & C_MAC:
                raise _refuse(StatusWord.SECURITY_STATUS_NOT_SATISFIED, "C-MAC required")
        return handler(sd, command)

    def _manages(self, sd: SecurityDomain, app: Application) -> bool:
        return app.sd_aid == sd.aid or bool(sd.privileges & Privilege.GLOBAL_DELETE)

    def _install(self, sd: SecurityDomain, command: CommandAPDU) -> ResponseAPDU:
        if not sd.privileges & (Privilege.AUTHORIZED_MANAGEMENT | Privilege.DELEGATED_MANAGEMENT):
            raise _refuse(StatusWord.SECURITY_STATUS_NOT_SATISFIED, "no management privilege")
        if command.p2 != 0x00:
            raise _refuse(StatusWord.INCORRECT_P1P2, "INSTALL P2")
        fields = _length_prefixed(command.data, 6)
        elf_aid, module_aid, app_aid, privileges, params, _token = fields
        p1 = command.p1 & 0x7F  # b8 is "more INSTALL commands" chaining, unused here
        if p1 == 0x20:  # [for personalization]: STORE DATA to follow goes to this application
            target = self.applications.get(app_aid)
            if target is None:
                raise _refuse(StatusWord.REFERENCED_DATA_NOT_FOUND, "no such application")
            self._personalizing = target.aid
            return ResponseAPDU(b"\x00", StatusWord.OK)
        if p1 == 0x08:  # [for make selectable] alone
            app = self.applications.get(app_aid)
            if app is None:
                raise _refuse(StatusWord.REFERENCED_DATA_NOT_FOUND, "no such application")
            if app.life_cycle != AppLifeCycle.INSTALLED or not self._manages(sd, app):
                raise _refuse(StatusWord.CONDITIONS_NOT_SATISFIED, "not installable state")
            app.life_cycle = AppLifeCycle.SELECTABLE
            return ResponseAPDU(b"\x00", StatusWord.OK)
        if p1 not in (0x04, 0x0C):
            raise _refuse(StatusWord.INCORRECT_P1P2, "INSTALL type")
        load_file = self.load_files.get(elf_aid)
        if load_file is None or module_aid not in load_file.modules:
            raise _refuse(StatusWord.REFERENCED_DATA_NOT_FOUND, "no such load file or module")
        if not app_aid or not 5 <= len(app_aid) <= 16:
            raise _refuse(StatusWord.WRONG_DATA, "application AID length")
        if app_aid in self.applications or app_aid in self.domains:
            raise _refuse(StatusWord.CONDITIONS_NOT_SATISFIED, "AID already registered")
        if len(privileges) not in (1, 3):
            raise _refuse(StatusWord.WRONG_DATA, "privileges length")
        privilege_bits = int.from_bytes(privileges.ljust(3, b"\x00"), "big")
        if privilege_bits & Privilege.SECURITY_DOMAIN:
            raise _refuse(StatusWord.CONDITIONS_NOT_SATISFIED, "SD creation not supported")
        application_params = b""
        if params:
            for tag, value in _pairs(params):
                if tag == 0xC9:
                    application_params = value
        applet = load_file.factory(app_aid, application_params)
        state = AppLifeCycle.SELECTABLE if p1 == 0x0C else AppLifeCycle.INSTALLED
        self.applications[app_aid] = Application(
            app_aid, elf_aid, module_aid, privilege_bits, state, sd.aid, applet
        )
        log.info("card_manager.installed", aid=app_aid.hex().upper(), state=f"{state:02X}")
        return ResponseAPDU(b"\x00", StatusWord.OK)

    def _delete(self, sd: SecurityDomain, command: CommandAPDU) -> ResponseAPDU:
        if command.p1 != 0x00 or command.p2 not in (0x00, 0x80):
            raise _refuse(StatusWord.INCORRECT_P1P2, "DELETE P1/P2")
        aid = None
        for tag, value in _pairs(command.data):
            if tag == 0x4F:
                aid = value
        if aid is None:
            raise _refuse(StatusWord.WRONG_DATA, "DELETE without 4F")
        app = self.applications.get(aid)
        if app is None:
            if aid in self.domains or aid in self.load_files:
                raise _refuse(StatusWord.CONDITIONS_NOT_SATISFIED, "cannot delete that object")
            raise _refuse(StatusWord.REFERENCED_DATA_NOT_FOUND, "no such application")
        if not self._manages(sd, app):
            raise _refuse(StatusWord.SECURITY_STATUS_NOT_SATISFIED, "not this domain's application")
        # GP §11.2: deleting an application deletes every object it owns, keys included.
        del self.applications[aid]
        log.info("card_manager.deleted", aid=aid.hex().upper())
        return ResponseAPDU(b"\x00", StatusWord.OK)

    def _get_status(self, sd: SecurityDomain, command: CommandAPDU) -> ResponseAPDU:
        if command.p2 not in (0x02, 0x03):
            raise _refuse(StatusWord.INCORRECT_P1P2, "GET STATUS supports the TLV format only")
        if command.p2 == 0x03:  # next occurrence(s)
            if not self._status_pages:
                raise _refuse(StatusWord.REFERENCED_DATA_NOT_FOUND, "no more data")
            return self._next_status_page()
        criteria = _pairs(command.data)
        prefix = next((value for tag, value in criteria if tag == 0x4F), None)
        if prefix is None:
            raise _refuse(StatusWord.WRONG_DATA, "GET STATUS needs a 4F search criterion")
        records = self._status_records(command.p1, sd)
        matching = [body for aid, body in records if aid.startswith(prefix)]
        if not matching:
            raise _refuse(StatusWord.REFERENCED_DATA_NOT_FOUND, "nothing matches")
        pages: list[bytes] = []
        page = b""
        for record in (tlv.encode(0xE3, body) for body in matching):
            if page and len(page) + len(record) > GET_STATUS_CHUNK:
                pages.append(page)
                page = b""
            page += record
        pages.append(page)
        self._status_pages = pages
        return self._next_status_page()

    def _next_status_page(self) -> ResponseAPDU:
        page = self._status_pages.pop(0)
        return ResponseAPDU(page, SW_MORE_DATA if self._status_pages else StatusWord.OK)

    def _status_records(self, p1: int, sd: SecurityDomain) -> list[tuple[bytes, bytes]]:
        visible_all = bool(sd.privileges & Privilege.GLOBAL_REGISTRY)
        if p1 == 0x80:
            isd = self.isd
            return [(isd.aid, self._sd_record(isd, self.life_cycle))]
        if p1 == 0x40:
            records = [
                (d.aid, self._sd_record(d, d.life_cycle))
                for d in self.domains.values()
                if d is not self.isd and (visible_all or d.aid == sd.aid)
            ]
            for app in self.applications.values():
                if visible_all or app.sd_aid == sd.aid:
                    records.append((app.aid, self._app_record(app)))
            return records
        if p1 in (0x20, 0x10):
            records = []
            for lf in self.load_files.values():
                body = tlv.encode(0x4F, lf.aid) + tlv.encode(0x9F70, bytes([AppLifeCycle.LOADED]))
                if p1 == 0x10:
                    body += b"".join(tlv.encode(0x84, m) for m in lf.modules)
                body += tlv.encode(0xCC, self.isd.aid)
                records.append((lf.aid, body))
            return records
        raise _refuse(StatusWord.INCORRECT_P1P2, "GET STATUS P1")

    @staticmethod
    def _sd_record(sd: SecurityDomain, life_cycle: int) -> bytes:
        body = (
            tlv.encode(0x4F, sd.aid)
            + tlv.encode(0x9F70, bytes([life_cycle]))
            + tlv.encode(0xC5, sd.privileges.to_bytes(3, "big"))
        )
        if sd.associated_sd is not None:
            body += tlv.encode(0xCC, sd.associated_sd)
        return body

    @staticmethod
    def _app_record(app: Application) -> bytes:
        owner = app.applet.owner_reference()
        body = (
            tlv.encode(0x4F, app.aid)
            + tlv.encode(0x9F70, bytes([app.life_cycle]))
            + tlv.encode(0xC5, app.privileges.to_bytes(3, "big"))
            + tlv.encode(0xC4, app.elf_aid)
            + tlv.encode(0xCC, app.sd_aid)
            + tlv.encode(TAG_HOLDS_KEYS, b"\x01" if app.applet.holds_keys() else b"\x00")
        )
        if owner is not None:
            body += tlv.encode(TAG_OWNER_REFERENCE, owner.encode("utf-8"))
        return body

    def _set_status(self, sd: SecurityDomain, command: CommandAPDU) -> ResponseAPDU:
        if command.p1 == 0x80:
            return self._set_card_status(sd, command.p2)
        if command.p1 != 0x40:
            raise _refuse(StatusWord.INCORRECT_P1P2, "SET STATUS P1")
        app = self.applications.get(command.data)
        if app is None:
            raise _refuse(StatusWord.REFERENCED_DATA_NOT_FOUND, "no such application")
        if not self._manages(sd, app) and not sd.privileges & Privilege.GLOBAL_LOCK:
            raise _refuse(StatusWord.SECURITY_STATUS_NOT_SATISFIED, "not this domain's application")
        state, target = app.life_cycle, command.p2
        if target & AppLifeCycle.LOCKED_BIT:  # lock, keeping the prior state underneath
            app.life_cycle = state | AppLifeCycle.LOCKED_BIT
        elif target == 0x00:  # unlock
            if not state & AppLifeCycle.LOCKED_BIT:
                raise _refuse(StatusWord.CONDITIONS_NOT_SATISFIED, "not locked")
            app.life_cycle = state & 0x7F
        elif target & 0x07 == 0x07:  # application-specific state 0xxxx111
            if state & AppLifeCycle.LOCKED_BIT or state < AppLifeCycle.SELECTABLE:
                raise _refuse(StatusWord.CONDITIONS_NOT_SATISFIED, "locked or not selectable")
            app.life_cycle = target
        else:
            raise _refuse(StatusWord.INCORRECT_P1P2, "not a valid application state")
        if app.life_cycle & AppLifeCycle.LOCKED_BIT and self._selected.app is app:
            self.reset()
        return ResponseAPDU.status(StatusWord.OK)

    def _set_card_status(self, sd: SecurityDomain, target: int) -> ResponseAPDU:
        if sd is not self.isd:
            raise _refuse(StatusWord.SECURITY_STATUS_NOT_SATISFIED, "only the ISD sets card state")
        try:
            new = CardLifeCycle(target)
        except ValueError:
            raise _refuse(StatusWord.INCORRECT_P1P2, "not a card life cycle state") from None
        allowed = {
            CardLifeCycle.OP_READY: {CardLifeCycle.INITIALIZED, CardLifeCycle.SECURED},
            CardLifeCycle.INITIALIZED: {CardLifeCycle.SECURED},
            CardLifeCycle.SECURED: {CardLifeCycle.CARD_LOCKED},
            CardLifeCycle.CARD_LOCKED: {CardLifeCycle.SECURED},
            CardLifeCycle.TERMINATED: set(),
        }[self.life_cycle]
        if new != CardLifeCycle.TERMINATED and new not in allowed:
            raise _refuse(StatusWord.CONDITIONS_NOT_SATISFIED, "card life cycle transition")
        if self.life_cycle == CardLifeCycle.TERMINATED:
            raise _refuse(StatusWord.CONDITIONS_NOT_SATISFIED, "card terminated")
        self.life_cycle = new
        log.info("card_manager.card_life_cycle", state=new.name)
        return ResponseAPDU.status(StatusWord.OK)

    def _put_key(self, sd: SecurityDomain, command: CommandAPDU) -> ResponseAPDU:
        channel = self._channel
        assert channel is not None
        replaced_kvn, key_id = command.p1, command.p2 & 0x7F
        if key_id != 0x01 or not command.p2 & 0x80:
            raise _refuse(StatusWord.INCORRECT_P1P2, "PUT KEY takes the three keys from id 1")
        if replaced_kvn and replaced_kvn not in sd.key_sets:
            raise _refuse(StatusWord.REFERENCED_DATA_NOT_FOUND, "no key set to replace")
        dek = channel.sd.key_sets[channel.kvn].dek
        try:
            new_kvn, components = parse_put_key_data(dek, command.data)
        except KeyBlockError:
            raise _refuse(StatusWord.WRONG_DATA, "PUT KEY key data") from None
        keys = [component.key for component in components]
        if len(keys) != 3 or not 0x01 <= new_kvn <= 0x7F:
            raise _refuse(StatusWord.WRONG_DATA, "PUT KEY needs ENC, MAC, DEK and a KVN 01-7F")
        if not replaced_kvn and new_kvn in sd.key_sets:
            raise _refuse(StatusWord.CONDITIONS_NOT_SATISFIED, "key version exists")
        if replaced_kvn:
            del sd.key_sets[replaced_kvn]
        sd.key_sets[new_kvn] = KeySet(new_kvn, *keys)
        log.info("card_manager.key_set_put", kvn=new_kvn, replaced=replaced_kvn)
        response = bytes([new_kvn]) + b"".join(key_check_value(k) for k in keys)
        return ResponseAPDU(response, StatusWord.OK)

    def _store_data(self, sd: SecurityDomain, command: CommandAPDU) -> ResponseAPDU:
        if self._personalizing is not None:
            app = self.applications.get(self._personalizing)
            if app is None:
                raise _refuse(StatusWord.CONDITIONS_NOT_SATISFIED, "personalised application gone")
            return app.applet.process(command, self._applet_context())
        # STORE DATA to the security domain itself: BER-TLV card data (GP §11.11, P1 b5b4=10).
        if command.p1 & 0x18 != 0x10:
            raise _refuse(StatusWord.INCORRECT_P1P2, "only BER-TLV STORE DATA to the domain")
        if sd is not self.isd:
            raise _refuse(StatusWord.CONDITIONS_NOT_SATISFIED, "card data belongs to the ISD")
        updates: dict[str, bytes] = {}
        for tag, value in _pairs(command.data):
            if tag == 0x42:
                updates["iin"] = value
            elif tag == 0x45:
                updates["cin"] = value
            else:
                raise _refuse(StatusWord.REFERENCED_DATA_NOT_FOUND, f"unknown card data {tag:X}")
        self.identity = CardIdentity(
            cin=updates.get("cin", self.identity.cin),
            iin=updates.get("iin", self.identity.iin),
            kdd=self.identity.kdd,
            cplc=self.identity.cplc,
        )
        return ResponseAPDU.status(StatusWord.OK)

    def _get_data(self, command: CommandAPDU) -> ResponseAPDU:
        sd = self._selected.sd
        assert sd is not None
        tag = (command.p1 << 8) | command.p2
        if tag == 0x9F7F:
            value = tlv.encode(0x9F7F, self.identity.cplc)
        elif tag == 0x0045:
            value = tlv.encode(0x45, self.identity.cin)
        elif tag == 0x0042:
            value = tlv.encode(0x42, self.identity.iin)
        elif tag == 0x00C1:
            value = tlv.encode(0xC1, sd.sequence_counter.to_bytes(3, "big"))
        elif tag == 0x00E0:
            entries = b"".join(
                tlv.encode(0xC0, bytes([key_id, k.kvn, 0x88, len(key)]))
                for k in sorted(sd.key_sets.values(), key=lambda k: k.kvn)
                for key_id, key in ((1, k.enc), (2, k.mac), (3, k.dek))
            )
            value = tlv.encode(0xE0, entries)
        else:
            raise _refuse(StatusWord.REFERENCED_DATA_NOT_FOUND, "no such data object")
        return ResponseAPDU(value, StatusWord.OK)

    # ------------------------------------------------------------------ persistence

    def to_state(self) -> dict[str, Any]:
        return {
            "identity": self.identity.to_state(),
            "life_cycle": int(self.life_cycle),
            "security_domains": [d.to_state() for d in self.domains.values()],
            "applications": [
                {
                    "aid": a.aid.hex(),
                    "elf_aid": a.elf_aid.hex(),
                    "module_aid": a.module_aid.hex(),
                    "privileges": a.privileges,
                    "life_cycle": a.life_cycle,
                    "sd_aid": a.sd_aid.hex(),
                    "applet": a.applet.to_state(),
                }
                for a in self.applications.values()
            ],
        }

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Any],
        load_files: list[LoadFile],
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> CardManager:
        manager = cls(
            CardIdentity.from_state(state["identity"]),
            [SecurityDomain.from_state(d) for d in state["security_domains"]],
            load_files,
            life_cycle=CardLifeCycle(state["life_cycle"]),
            random_bytes=random_bytes,
        )
        for entry in state["applications"]:
            elf_aid = bytes.fromhex(entry["elf_aid"])
            applet = manager.load_files[elf_aid].factory.restore(entry["applet"])
            aid = bytes.fromhex(entry["aid"])
            manager.applications[aid] = Application(
                aid,
                elf_aid,
                bytes.fromhex(entry["module_aid"]),
                int(entry["privileges"]),
                int(entry["life_cycle"]),
                bytes.fromhex(entry["sd_aid"]),
                applet,
            )
        return manager


def _pairs(data: bytes) -> list[tuple[int, bytes]]:
    """(tag, value) of each top-level data object."""
    return [(node.tag, node.value) for node in tlv.decode(data)]


def _length_prefixed(data: bytes, count: int) -> list[bytes]:
    """Split ``count`` one-byte-length-prefixed fields (INSTALL data, GP §11.5.2.3)."""
    fields: list[bytes] = []
    offset = 0
    for _ in range(count):
        if offset >= len(data):
            raise _refuse(StatusWord.WRONG_DATA, "INSTALL data truncated")
        length = data[offset]
        end = offset + 1 + length
        if end > len(data):
            raise _refuse(StatusWord.WRONG_DATA, "INSTALL field overruns data")
        fields.append(data[offset + 1 : end])
        offset = end
    if offset != len(data):
        raise _refuse(StatusWord.WRONG_DATA, "trailing INSTALL data")
    return fields
