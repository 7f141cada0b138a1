"""The SP-TSM's messages: commands from the orchestrator, replies, and the phone's scripts.

Routing (``infra/bus.py``): ``tsm.cmd.<op>`` in (the ``tsm`` queue), ``tsm.reply.<op>`` out
(the ``orchestrator`` queue binds ``*.reply.#``). A script for a phone is an
``se.cmd.script`` published on ``device.<device_id>``; the phone answers with
``se.result.script`` (the ``tsm`` queue binds ``se.result.#``).

Every command carries a ``command_id``: the TSM's idempotency key. A command re-sent with
the same id gets the same reply, and an operation cut off mid-script is re-run safely.

Secrets: a reply to the orchestrator never carries a temporary PIN or a PUK. They travel
only in ``SeScript.temporary_pins``, the message meant for the phone's app, and their repr
is redacted. Master and SE keys appear in no message at all.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

from orchestrator.messages import CertificateKind, PinOption, SeIdentity
from protocol.envelope import message_type
from protocol.errors import Disposition

CommandId = Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9_.:-]{1,128}$")]
OwnerReference = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Der = Annotated[bytes, msgspec.Meta(min_length=1, max_length=4096)]


class ErrorCode(enum.StrEnum):
    """Why an operation failed, for the saga to decide: retry (transient) or compensate."""

    PHONE_UNREACHABLE = "phone_unreachable"  # transient: no answer in time
    COUNTER_DRIFT = "counter_drift"  # transient: re-synchronised; running again helps
    SECURE_CHANNEL = "secure_channel"  # a response failed its R-MAC, or the card refused us
    WRONG_KEYS = "wrong_keys"  # the card cryptogram did not verify: not the keys we hold
    CARD_ERROR = "card_error"  # a command returned an unexpected status word
    APPLET_HOLDS_KEYS = "applet_holds_keys"  # install refused: clean up first
    NOT_INSTALLED = "not_installed"
    UNKNOWN_SE = "unknown_se"
    BAD_PROOF = "bad_proof"  # a generated key's proof of possession did not verify
    BAD_REQUEST = "bad_request"


TRANSIENT_ERRORS = frozenset({ErrorCode.PHONE_UNREACHABLE, ErrorCode.COUNTER_DRIFT})


class Failure(msgspec.Struct, frozen=True, kw_only=True):
    code: ErrorCode
    detail: str = ""  # safe text: status words and step names, never data
    status_word: int | None = None

    @property
    def transient(self) -> bool:
        return self.code in TRANSIENT_ERRORS

    @property
    def disposition(self) -> Disposition:
        """What the saga engine reads to retry (transient) or compensate (rejected)."""
        return Disposition.TRANSIENT if self.transient else Disposition.REJECTED


class TsmCommand(msgspec.Struct, frozen=True, kw_only=True):
    command_id: CommandId
    device_id: str
    se: SeIdentity


class TsmReply(msgspec.Struct, frozen=True, kw_only=True):
    command_id: CommandId
    failure: Failure | None = None
    round_trips: int = 0

    @property
    def ok(self) -> bool:
        return self.failure is None


# -- inspect (phase 2): what is on the SE --------------------------------------------------


@message_type("tsm.cmd.inspect")
class InspectSe(TsmCommand, frozen=True, kw_only=True):
    pass


@message_type("tsm.reply.inspect")
class InspectSeReply(TsmReply, frozen=True, kw_only=True):
    applet_present: bool = False
    life_cycle: int | None = None  # GP application life cycle (07 selectable, b8 locked)
    holds_keys: bool = False
    owner_reference: str | None = None


# -- clean up (phase 2): delete an applet that holds keys, and say whose -----------------


@message_type("tsm.cmd.cleanup")
class CleanUpSe(TsmCommand, frozen=True, kw_only=True):
    pass


@message_type("tsm.reply.cleanup")
class CleanUpSeReply(TsmReply, frozen=True, kw_only=True):
    deleted: bool = False
    held_keys: bool = False
    owner_reference: str | None = None  # whose keys went with the applet


# -- install (phase 2 done) ------------------------------------------------------------------


@message_type("tsm.cmd.install")
class InstallApplet(TsmCommand, frozen=True, kw_only=True):
    pass


@message_type("tsm.reply.install")
class InstallAppletReply(TsmReply, frozen=True, kw_only=True):
    installed: bool = False


# -- prepare (phase 2 in one script): clean up whatever applet is there, then install ----------


@message_type("tsm.cmd.prepare")
class PrepareSe(TsmCommand, frozen=True, kw_only=True):
    pass


@message_type("tsm.reply.prepare")
class PrepareSeReply(TsmReply, frozen=True, kw_only=True):
    """What the SE held before (an applet, keys, whose) and that the new applet is in."""

    applet_was_present: bool = False
    deleted: bool = False
    held_keys: bool = False
    owner_reference: str | None = None  # whose keys went with the old applet
    installed: bool = False


# -- generate keys (step 8) -------------------------------------------------------------------


@message_type("tsm.cmd.generate_keys")
class GenerateKeys(TsmCommand, frozen=True, kw_only=True):
    certificates: Annotated[list[CertificateKind], msgspec.Meta(min_length=1, max_length=2)]
    owner_reference: OwnerReference


class PublicKey(msgspec.Struct, frozen=True, kw_only=True):
    kind: CertificateKind
    public_key_der: bytes  # SubjectPublicKeyInfo
    challenge: bytes  # the TSM's challenge the proof signs (protocol.jpki.proof_message)
    proof: bytes  # PKCS#1 v1.5 / SHA-256 by the new key; verified by the TSM


@message_type("tsm.reply.generate_keys")
class GenerateKeysReply(TsmReply, frozen=True, kw_only=True):
    public_keys: list[PublicKey] = msgspec.field(default_factory=list)


# -- store certificates and set temporary PINs (step 10) ------------------------------------


class CertificateToStore(msgspec.Struct, frozen=True, kw_only=True):
    kind: CertificateKind
    certificate: Der
    ca_certificate: Der


@message_type("tsm.cmd.store_certificates")
class StoreCertificates(TsmCommand, frozen=True, kw_only=True):
    certificates: Annotated[list[CertificateToStore], msgspec.Meta(min_length=1, max_length=2)]
    pin_option: PinOption


@message_type("tsm.reply.store_certificates")
class StoreCertificatesReply(TsmReply, frozen=True, kw_only=True):
    stored: list[CertificateKind] = msgspec.field(default_factory=list)


# -- release just before local PIN setting (step 11) -----------------------------------------


@message_type("tsm.cmd.release")
class ReleasePins(TsmCommand, frozen=True, kw_only=True):
    certificates: Annotated[list[CertificateKind], msgspec.Meta(min_length=1, max_length=2)]
    pin_option: PinOption


@message_type("tsm.reply.release")
class ReleasePinsReply(TsmReply, frozen=True, kw_only=True):
    released: list[CertificateKind] = msgspec.field(default_factory=list)
    pins_delivered: bool = False  # the temporary PINs went to the app (never in this reply)


# -- reset a PIN (forgotten or blocked) ------------------------------------------------------


@message_type("tsm.cmd.reset_pin")
class ResetPin(TsmCommand, frozen=True, kw_only=True):
    certificates: Annotated[list[CertificateKind], msgspec.Meta(min_length=1, max_length=2)]


@message_type("tsm.reply.reset_pin")
class ResetPinReply(TsmReply, frozen=True, kw_only=True):
    reset: list[CertificateKind] = msgspec.field(default_factory=list)
    pins_delivered: bool = False


# -- wipe and delete (compensation, loss, disposal) ------------------------------------------


@message_type("tsm.cmd.wipe")
class WipeApplet(TsmCommand, frozen=True, kw_only=True):
    delete_applet: bool = True


@message_type("tsm.reply.wipe")
class WipeAppletReply(TsmReply, frozen=True, kw_only=True):
    wiped: bool = False
    deleted: bool = False


# -- rotate the SE's SCP03 keys (batch runs) -------------------------------------------------


@message_type("tsm.cmd.rotate_keys")
class RotateKeys(TsmCommand, frozen=True, kw_only=True):
    new_kvn: int | None = None  # default: the TSM's current master key version


@message_type("tsm.reply.rotate_keys")
class RotateKeysReply(TsmReply, frozen=True, kw_only=True):
    key_version: int | None = None


# -- TSM <-> phone -----------------------------------------------------------------------------


class ScriptStep(msgspec.Struct, frozen=True, array_like=True):
    apdu: bytes
    expect: list[int]  # status words that let the phone go on to the next step


class TemporaryPin(msgspec.Struct, frozen=True, kw_only=True):
    kind: CertificateKind
    pin: str
    puk: str | None = None  # option 6 only

    def __repr__(self) -> str:
        return f"TemporaryPin(kind={self.kind.value}, <redacted>)"


@message_type("se.cmd.script")
class SeScript(msgspec.Struct, frozen=True, kw_only=True):
    """Run ``steps`` in order on the SE; stop at the first status word not in ``expect``."""

    script_id: str
    operation: str
    steps: list[ScriptStep]
    temporary_pins: list[TemporaryPin] = msgspec.field(default_factory=list)

    def __repr__(self) -> str:
        return (
            f"SeScript({self.script_id}, {self.operation}, {len(self.steps)} steps, "
            f"{len(self.temporary_pins)} temporary PINs)"
        )


@message_type("se.result.script")
class SeScriptResult(msgspec.Struct, frozen=True, kw_only=True):
    script_id: str
    responses: list[bytes]
    completed: bool


COMMAND_TYPES: dict[str, type[TsmCommand]] = {
    "inspect": InspectSe,
    "cleanup": CleanUpSe,
    "install": InstallApplet,
    "prepare": PrepareSe,
    "generate_keys": GenerateKeys,
    "store_certificates": StoreCertificates,
    "release": ReleasePins,
    "reset_pin": ResetPin,
    "wipe": WipeApplet,
    "rotate_keys": RotateKeys,
}
