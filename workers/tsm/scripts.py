"""The SP-TSM's pure core: APDU scripts for each operation, and the check of their answers.

An operation is an ``OperationPlan``: the application to select (the SP-TSM's security
domain for card management, the JPKI applet for personalisation) and the plain commands
to run in one SCP03 session, each with the status words that let the script go on.
``ScriptSession`` turns a plan into what the phone runs:

- pseudo-random card challenge (one round trip): SELECT, INITIALIZE UPDATE, EXTERNAL
  AUTHENTICATE and every command wrapped, all computed offline from the counter the TSM
  predicts (GP Amd D §6.2.2.1);
- random card challenge (two round trips): SELECT + INITIALIZE UPDATE, then EXTERNAL
  AUTHENTICATE + the wrapped commands.

Every answer is untrusted: the INITIALIZE UPDATE response is checked against the
prediction (counter, challenge, card cryptogram), every response's R-MAC is verified and
its data decrypted before anything reads it. ``interpret_*`` functions then read the
plain responses of one operation. Nothing here does I/O.
"""

from __future__ import annotations

import enum
import functools
import os
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from orchestrator.messages import CertificateKind, PinOption
from protocol import jpki, tlv
from protocol.apdu import CommandAPDU, ResponseAPDU
from protocol.errors import CardError, JpkiError, MalformedAPDU, MalformedTLV, SecureChannelError
from protocol.scp03 import key_check_value
from protocol.scp03.host import AuthenticatedHost, HostSession, OfflineHostSession
from protocol.scp03.keyblock import put_key_command
from protocol.scp03.keys import StaticKeys

Random = Callable[[int], bytes]

DEFAULT_SECURITY_LEVEL = 0x33  # C-MAC | C-DEC | R-MAC | R-ENC
SP_SD_AID = bytes.fromhex("A000000151535054534D")
JPKI_ELF_AID = bytes.fromhex("D392F0002601")
JPKI_MODULE_AID = jpki.AID
JPKI_INSTANCE_AID = jpki.AID
OK = 0x9000
SW_NOT_FOUND = 0x6A88
SW_CONDITIONS = 0x6985
# Proprietary GET STATUS tags of our SE (docs/tsm.md): keys held, and whose.
TAG_HOLDS_KEYS = 0xDF70
TAG_OWNER_REFERENCE = 0xDF71

KEY_EF = {CertificateKind.AUTH: jpki.EF.AUTH_KEY, CertificateKind.SIGN: jpki.EF.SIGN_KEY}
PIN_EF = {CertificateKind.AUTH: jpki.EF.AUTH_PIN, CertificateKind.SIGN: jpki.EF.SIGN_PIN}
CERT_EF = {CertificateKind.AUTH: jpki.EF.AUTH_CERT, CertificateKind.SIGN: jpki.EF.SIGN_CERT}
CA_CERT_EF = {
    CertificateKind.AUTH: jpki.EF.AUTH_CA_CERT,
    CertificateKind.SIGN: jpki.EF.SIGN_CA_CERT,
}
TEMPORARY_PIN_MODE = {
    PinOption.USER_TYPES_TEMPORARY: jpki.TemporaryPinMode.USABLE,
    PinOption.APP_TYPES_TEMPORARY: jpki.TemporaryPinMode.USABLE,
    PinOption.BLOCKED_UNTIL_RELEASED: jpki.TemporaryPinMode.BLOCKED,
    PinOption.INITIAL_STATE: jpki.TemporaryPinMode.INITIAL,
    PinOption.REAL_PIN_AT_APPLICATION: jpki.TemporaryPinMode.USABLE,
    PinOption.PUK: jpki.TemporaryPinMode.PUK,
}
# What "released" means per option: the state the PIN must be in for local PIN setting.
RELEASED_STATES = {
    jpki.TemporaryPinMode.USABLE: {jpki.PinState.TEMPORARY},
    jpki.TemporaryPinMode.BLOCKED: {jpki.PinState.TEMPORARY},
    jpki.TemporaryPinMode.INITIAL: {jpki.PinState.INITIAL_RELEASED},
    jpki.TemporaryPinMode.PUK: {jpki.PinState.PUK_LOCKED},
}


class ScriptFailed(CardError):
    """A step of a script answered with a status word the TSM did not allow."""

    def __init__(self, sw: int, step: str) -> None:
        super().__init__(sw, step)
        self.step = step


class BadProof(JpkiError):
    """A generated key's proof of possession does not verify: the key is not trusted."""

    remote_fault = True


class UnexpectedAnswer(JpkiError):
    """The SE answered a well-protected response whose content makes no sense."""

    remote_fault = True


# ------------------------------------------------------------------------------- plans


# The values built for every operation (steps, plan, wire steps, PINs) are frozen
# ``msgspec.Struct``s: a tenth of a frozen dataclass's construction time, same semantics.
class Step(msgspec.Struct, frozen=True):
    name: str
    command: CommandAPDU
    expect: tuple[int, ...] = (OK,)


class OperationPlan(msgspec.Struct, frozen=True):
    operation: str
    target_aid: bytes
    steps: tuple[Step, ...]


@functools.lru_cache(maxsize=16)  # a handful of AIDs: the SP-TSM's domain, the JPKI applet
def _select(aid: bytes) -> bytes:
    return CommandAPDU(0x00, 0xA4, 0x04, 0x00, aid, le=256).to_bytes()


def get_status_command(aid: bytes) -> CommandAPDU:
    """GET STATUS of applications and SDs matching ``aid``, TLV format (GP §11.4)."""
    return CommandAPDU(0x80, 0xF2, 0x40, 0x02, tlv.encode(0x4F, aid), le=256)


def delete_command(aid: bytes) -> CommandAPDU:
    """DELETE the application and everything it owns (GP §11.2)."""
    return CommandAPDU(0x80, 0xE4, 0x00, 0x00, tlv.encode(0x4F, aid), le=256)


def install_command(
    elf_aid: bytes, module_aid: bytes, instance_aid: bytes, privileges: bytes = b"\x00"
) -> CommandAPDU:
    """INSTALL [for install and make selectable] (GP §11.5.2.3), no parameters, no token."""
    data = b"".join(bytes((len(f),)) + f for f in (elf_aid, module_aid, instance_aid, privileges))
    data += b"\x02\xc9\x00" + b"\x00"
    return CommandAPDU(0x80, 0xE6, 0x0C, 0x00, data, le=256)


# Phase 2's steps on the SP-TSM domain: what is there ('6A88' when no applet is), and the
# applet's DELETE (its keys go with it, GP §11.2; '6A88' when there is none); the same
# commands every time, so built once.
_APPLET_STATUS = Step("GET STATUS", get_status_command(JPKI_INSTANCE_AID), (OK, SW_NOT_FOUND))
_DELETE_APPLET = Step("DELETE", delete_command(JPKI_INSTANCE_AID), (OK, SW_NOT_FOUND))
_INSTALL_APPLET = install_command(JPKI_ELF_AID, JPKI_MODULE_AID, JPKI_INSTANCE_AID)
_NEW_APPLET_STATUS = Step("GET STATUS", get_status_command(JPKI_INSTANCE_AID))


def plan_inspect() -> OperationPlan:
    return OperationPlan("inspect", SP_SD_AID, (_APPLET_STATUS,))


def plan_cleanup() -> OperationPlan:
    return OperationPlan("cleanup", SP_SD_AID, (_APPLET_STATUS, _DELETE_APPLET))


def plan_install() -> OperationPlan:
    # Re-running after an interruption finds the applet already there ('6985'); the GET
    # STATUS that follows says whether it is the clean, selectable applet we want.
    return OperationPlan(
        "install",
        SP_SD_AID,
        (Step("INSTALL", _INSTALL_APPLET, (OK, SW_CONDITIONS)), _NEW_APPLET_STATUS),
    )


def plan_prepare() -> OperationPlan:
    """Phase 2 as one script (FLOWS.md "throughput shape": steps 2–4 are one SCP03 script):
    what is there, DELETE it whatever it holds (an applet is never reused; '6A88' when there
    is none), INSTALL, and the new applet's status."""
    return OperationPlan(
        "prepare",
        SP_SD_AID,
        (_APPLET_STATUS, _DELETE_APPLET, Step("INSTALL", _INSTALL_APPLET), _NEW_APPLET_STATUS),
    )


def plan_generate_keys(
    kinds: Sequence[CertificateKind], owner_reference: str, challenges: Sequence[bytes]
) -> OperationPlan:
    steps = [Step("SET OWNER REFERENCE", jpki.set_owner_reference(owner_reference))]
    for kind, challenge in zip(kinds, challenges, strict=True):
        steps.append(
            Step(f"GENERATE KEY PAIR {kind.value}", jpki.generate_key_pair(KEY_EF[kind], challenge))
        )
    return OperationPlan("generate_keys", JPKI_INSTANCE_AID, tuple(steps))


class TemporaryPinValue(msgspec.Struct, frozen=True):
    kind: CertificateKind
    pin: str
    puk: str | None = None

    def __repr__(self) -> str:
        return f"TemporaryPinValue(kind={self.kind!r}, <redacted>)"


def plan_store_certificates(
    certificates: Sequence[tuple[CertificateKind, bytes, bytes]],
    mode: jpki.TemporaryPinMode,
    pins: Sequence[TemporaryPinValue],
) -> OperationPlan:
    """Both certificates, their CA certificates and the temporary PINs: one script."""
    steps: list[Step] = []
    for kind, certificate, ca_certificate in certificates:
        for ef, der, what in ((CERT_EF[kind], certificate, "certificate"),
                              (CA_CERT_EF[kind], ca_certificate, "CA certificate")):
            for command in jpki.write_certificate(ef, der):
                steps.append(Step(f"WRITE {kind.value} {what}", command))
    for pin in pins:
        puk = pin.puk.encode("ascii") if pin.puk is not None else None
        steps.append(
            Step(
                f"SET TEMPORARY PIN {pin.kind.value}",
                jpki.set_temporary_pin(PIN_EF[pin.kind], pin.pin.encode("ascii"), mode, puk),
            )
        )
    return OperationPlan("store_certificates", JPKI_INSTANCE_AID, tuple(steps))


def plan_release(kinds: Sequence[CertificateKind], mode: jpki.TemporaryPinMode) -> OperationPlan:
    # A re-run finds the PIN already released ('6985'); GET PIN STATUS then tells the truth.
    again = (OK, SW_CONDITIONS)
    steps: list[Step] = []
    for kind in kinds:
        if mode is jpki.TemporaryPinMode.BLOCKED:  # option 3: lift the block
            steps.append(Step(f"UNBLOCK PIN {kind.value}", jpki.unblock_pin(PIN_EF[kind]), again))
        elif mode is jpki.TemporaryPinMode.INITIAL:  # option 4: the special transition
            steps.append(
                Step(f"TRANSITION PIN {kind.value}", jpki.transition_pin(PIN_EF[kind]), again)
            )
        steps.append(Step(f"GET PIN STATUS {kind.value}", jpki.get_pin_status(PIN_EF[kind])))
    return OperationPlan("release", JPKI_INSTANCE_AID, tuple(steps))


def plan_reset_pin(pins: Sequence[TemporaryPinValue]) -> OperationPlan:
    steps: list[Step] = []
    for pin in pins:
        steps.append(
            Step(
                f"SET TEMPORARY PIN {pin.kind.value}",
                jpki.set_temporary_pin(
                    PIN_EF[pin.kind], pin.pin.encode("ascii"), jpki.TemporaryPinMode.USABLE
                ),
            )
        )
        status = jpki.get_pin_status(PIN_EF[pin.kind])
        steps.append(Step(f"GET PIN STATUS {pin.kind.value}", status))
    return OperationPlan("reset_pin", JPKI_INSTANCE_AID, tuple(steps))


def plan_wipe(delete_applet: bool) -> OperationPlan:
    if delete_applet:  # deleting the applet deletes its keys with it
        return OperationPlan("wipe", SP_SD_AID, (_DELETE_APPLET,))
    return OperationPlan("wipe", JPKI_INSTANCE_AID, (Step("WIPE KEYS", jpki.wipe_keys()),))


def plan_rotate(current_kvn: int, new_kvn: int, dek: bytes, new_keys: StaticKeys) -> OperationPlan:
    return OperationPlan(
        "rotate_keys",
        SP_SD_AID,
        (
            Step(
                "PUT KEY",
                put_key_command(
                    dek,
                    old_key_version=current_kvn,
                    new_key_version=new_kvn,
                    keys=[new_keys.enc, new_keys.mac, new_keys.dek],
                ),
            ),
        ),
    )


# ------------------------------------------------------------------------------- sessions


class SeAccess(msgspec.Struct, frozen=True):
    """What the TSM needs to open a session with one SE's security domain."""

    keys: StaticKeys
    key_version: int
    kdd: bytes
    sd_aid: bytes = SP_SD_AID

    def __repr__(self) -> str:
        return f"SeAccess(kvn={self.key_version:02X}, kdd={self.kdd.hex().upper()}, <keys>)"


class WireStep(msgspec.Struct, frozen=True):
    apdu: bytes
    expect: tuple[int, ...]


class ScriptSession:
    """One operation's SCP03 session: the wire scripts out, the verified answers in."""

    def __init__(
        self,
        plan: OperationPlan,
        access: SeAccess,
        *,
        security_level: int = DEFAULT_SECURITY_LEVEL,
        random: Random = os.urandom,
    ) -> None:
        self.plan = plan
        self.access = access
        self.security_level = security_level
        self._random = random
        self._offline: OfflineHostSession | None = None
        self._host: HostSession | None = None
        self._authenticated: AuthenticatedHost | None = None

    # -- one round trip ---------------------------------------------------------------

    def offline_script(self, sequence_counter: int) -> list[WireStep]:
        """SELECT, IU, EA and every command, for an SE whose next counter is predicted."""
        access = self.access
        session = OfflineHostSession.predict(
            access.keys,
            key_version=access.key_version,
            sequence_counter=sequence_counter,
            sd_aid=access.sd_aid,
            security_level=self.security_level,
            key_diversification_data=access.kdd,
            random=self._random,
        )
        self._offline = session
        wrapped = session.script(step.command for step in self.plan.steps)
        wire = [WireStep(_select(self.plan.target_aid), (OK,))]
        wire += [WireStep(apdu.to_bytes(), (OK,)) for apdu in wrapped[:2]]
        wire += [
            WireStep(apdu.to_bytes(), step.expect)
            for apdu, step in zip(wrapped[2:], self.plan.steps, strict=True)
        ]
        return wire

    def verify_offline(self, responses: Sequence[bytes]) -> list[ResponseAPDU]:
        """Verify SELECT, IU (counter, challenge, cryptogram), EA and every response."""
        session = self._offline
        if session is None:
            raise SecureChannelError("no offline script was built")
        parsed = _parse_responses(responses, len(self.plan.steps) + 3)
        _check_sw(parsed[0], (OK,), f"SELECT {self.plan.target_aid.hex().upper()}")
        if len(parsed) < 2:
            raise ScriptFailed(parsed[0].sw, "SELECT")
        _check_sw(parsed[1], (OK,), "INITIALIZE UPDATE")  # '6A88': no such key version
        session.unwrap(parsed[1])  # raises SequenceCounterMismatch on drift
        if len(parsed) < 3:
            raise ScriptFailed(parsed[1].sw, "INITIALIZE UPDATE")
        session.unwrap(parsed[2])  # EA refused: CryptogramMismatch
        return self._verify_commands(session, parsed[3:])

    def counter_is_authentic(self, responses: Sequence[bytes], counter: int) -> bool:
        """Whether the INITIALIZE UPDATE answer really comes from the SE at ``counter``.

        The counter in that answer is not protected; its card cryptogram is. It verifies
        only with the challenge of the true counter, so a forged counter cannot make the
        TSM move its record (which would deny the SE service).
        """
        session = self._offline
        if session is None or len(responses) < 2:
            return False
        access = self.access
        try:
            probe = OfflineHostSession.predict(
                access.keys,
                key_version=access.key_version,
                sequence_counter=counter,
                sd_aid=access.sd_aid,
                security_level=self.security_level,
                host_challenge=session.initialize_update_command.data,
                key_diversification_data=access.kdd,
            )
            probe.unwrap(ResponseAPDU.from_bytes(responses[1]))
        except (SecureChannelError, MalformedAPDU):
            return False
        return True

    # -- two round trips ---------------------------------------------------------------

    def first_round(self) -> list[WireStep]:
        """SELECT + INITIALIZE UPDATE for an SE with a random card challenge."""
        self._host = HostSession(
            self.access.keys, key_version=self.access.key_version, random=self._random
        )
        return [
            WireStep(_select(self.plan.target_aid), (OK,)),
            WireStep(self._host.initialize_update().to_bytes(), (OK,)),
        ]

    def second_round(self, responses: Sequence[bytes]) -> list[WireStep]:
        """Check the card cryptogram, then EXTERNAL AUTHENTICATE and every command."""
        host = self._host
        if host is None:
            raise SecureChannelError("first round was not built")
        parsed = _parse_responses(responses, 2)
        _check_sw(parsed[0], (OK,), "SELECT")
        if len(parsed) < 2:
            raise ScriptFailed(parsed[0].sw, "SELECT")
        _check_sw(parsed[1], (OK,), "INITIALIZE UPDATE")
        authenticated = host.on_initialize_update_response(parsed[1])
        if authenticated.info.key_diversification_data != self.access.kdd:
            raise SecureChannelError("key diversification data is not this SE's")
        self._authenticated = authenticated
        ea = authenticated.external_authenticate(self.security_level)
        wire = [WireStep(ea.to_bytes(), (OK,))]
        wire += [
            WireStep(authenticated.wrap(step.command).to_bytes(), step.expect)
            for step in self.plan.steps
        ]
        return wire

    def verify_second_round(self, responses: Sequence[bytes]) -> list[ResponseAPDU]:
        session = self._authenticated
        if session is None:
            raise SecureChannelError("second round was not built")
        parsed = _parse_responses(responses, len(self.plan.steps) + 1)
        session.unwrap(parsed[0])
        return self._verify_commands(session, parsed[1:])

    def _verify_commands(
        self, session: AuthenticatedHost, parsed: Sequence[ResponseAPDU]
    ) -> list[ResponseAPDU]:
        plains: list[ResponseAPDU] = []
        for step, response in zip(self.plan.steps, parsed, strict=False):
            plain = session.unwrap(response)
            _check_sw(plain, step.expect, step.name)
            plains.append(plain)
        if len(plains) != len(self.plan.steps):
            raise SecureChannelError("the phone returned fewer answers than the script has steps")
        return plains


def _parse_responses(responses: Sequence[bytes], at_most: int) -> list[ResponseAPDU]:
    if not responses:
        raise SecureChannelError("the phone returned no answer")
    if len(responses) > at_most:
        raise SecureChannelError("the phone returned more answers than the script has steps")
    try:
        return [ResponseAPDU.from_bytes(r) for r in responses]
    except MalformedAPDU:
        raise SecureChannelError("an answer is not a response APDU") from None


def _check_sw(response: ResponseAPDU, expect: tuple[int, ...], step: str) -> None:
    if response.sw not in expect:
        raise ScriptFailed(response.sw, step)


# ------------------------------------------------------------------------------- answers


@dataclass(frozen=True, slots=True)
class AppletStatus:
    present: bool
    life_cycle: int | None = None
    holds_keys: bool = False
    owner_reference: str | None = None


def interpret_status(response: ResponseAPDU, aid: bytes = JPKI_INSTANCE_AID) -> AppletStatus:
    """Read our applet's entry from a GET STATUS answer ('6A88': not installed)."""
    if response.sw == SW_NOT_FOUND:
        return AppletStatus(present=False)
    try:
        for template in tlv.decode(response.data):
            if template.tag != 0xE3:
                continue
            fields = {node.tag: node.value for node in template.children}
            if fields.get(0x4F) != aid:
                continue
            life_cycle = fields.get(0x9F70, b"")
            owner = fields.get(TAG_OWNER_REFERENCE)
            return AppletStatus(
                present=True,
                life_cycle=life_cycle[0] if len(life_cycle) == 1 else None,
                holds_keys=fields.get(TAG_HOLDS_KEYS) == b"\x01",
                owner_reference=owner.decode("utf-8", errors="replace") if owner else None,
            )
    except MalformedTLV:
        raise UnexpectedAnswer("GET STATUS answer is not BER-TLV") from None
    return AppletStatus(present=False)


@dataclass(frozen=True, slots=True)
class VerifiedPublicKey:
    kind: CertificateKind
    public_key_der: bytes
    challenge: bytes
    proof: bytes


def interpret_generated_key(
    kind: CertificateKind, challenge: bytes, response: ResponseAPDU
) -> VerifiedPublicKey:
    """The new public key, after checking its proof of possession over our challenge."""
    try:
        generated = jpki.parse_generate_key_pair(response)
        public_key = serialization.load_der_public_key(generated.public_key_der)
    except (JpkiError, ValueError):
        raise UnexpectedAnswer("GENERATE KEY PAIR answer is malformed") from None
    if not isinstance(public_key, rsa.RSAPublicKey) or public_key.key_size != 2048:
        raise UnexpectedAnswer("generated key is not RSA-2048")
    message = jpki.proof_message(KEY_EF[kind], challenge, generated.public_key_der)
    try:
        public_key.verify(generated.proof, message, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise BadProof("proof of possession does not verify") from None
    return VerifiedPublicKey(kind, generated.public_key_der, challenge, generated.proof)


def interpret_pin_status(response: ResponseAPDU) -> jpki.PinStatus:
    try:
        return jpki.PinStatus.from_bytes(response.data)
    except CardError:
        raise UnexpectedAnswer("GET PIN STATUS answer is malformed") from None


def interpret_put_key(response: ResponseAPDU, new_kvn: int, keys: StaticKeys) -> None:
    """PUT KEY answers the new KVN and the KCV of each key: they must be ours."""
    check_values = (key_check_value(k) for k in (keys.enc, keys.mac, keys.dek))
    expected = bytes((new_kvn,)) + b"".join(check_values)
    if response.data != expected:
        raise UnexpectedAnswer("PUT KEY answer does not confirm the new keys")


# ------------------------------------------------------------------------------- PINs


class PinAlphabet(enum.Enum):
    DIGITS = string.digits
    UPPER_DIGITS = string.ascii_uppercase + string.digits


def random_string(alphabet: str, length: int, random: Random) -> str:
    """Uniform characters from a CSPRNG by rejection sampling (no modulo bias)."""
    size = len(alphabet)
    limit = 256 - 256 % size
    out: list[str] = []
    while len(out) < length:
        out += [alphabet[byte % size] for byte in random(length * 2) if byte < limit]
    return "".join(out[:length])


def new_temporary_pin(
    kind: CertificateKind, mode: jpki.TemporaryPinMode, random: Random
) -> TemporaryPinValue:
    """A temporary PIN that meets the PIN rule of its kind (DOMAIN.md §1)."""
    if kind is CertificateKind.AUTH:
        pin = random_string(PinAlphabet.DIGITS.value, jpki.AUTH_PIN_RULE.max_length, random)
    else:
        pin = random_string(PinAlphabet.UPPER_DIGITS.value, jpki.SIGN_PIN_RULE.max_length, random)
    puk = None
    if mode is jpki.TemporaryPinMode.PUK:
        puk = random_string(PinAlphabet.DIGITS.value, jpki.PUK_RULE.max_length, random)
    return TemporaryPinValue(kind, pin, puk)
