"""The JPKI CA's messages: commands in (``ca.cmd.<op>``, the ``ca`` queue), replies out
(``ca.reply.<op>``, which the ``orchestrator`` queue binds with ``*.reply.#``).

The saga a command belongs to travels in the envelope's ``saga_id``; verification, the
state check and issuance need it (issuance is idempotent by saga and certificate type).
Every command carries a ``command_id``, echoed in its reply. A command re-sent with the
same message id is answered once (inbox); re-sent with a new id it is answered the same
(the operations are idempotent).

A refusal is a reply with a ``Failure`` (a ``CaErrorCode`` and a fixed, data-free
description), never exception text. Nonces are the orchestrator's: it sends the one it gave
the app in ``VerifyApplication.nonce``; the CA keeps the ledger that makes each single-use.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from protocol.envelope import message_type
from workers.ca.application import SeIdentity
from workers.ca.errors import CaErrorCode
from workers.ca.profiles import CertType, Holder
from workers.ca.revocation import Cause, Status
from workers.ca.state_check import Branch

CommandId = Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9_.:-]{1,128}$")]
Serial = Annotated[str, msgspec.Meta(pattern="^[0-9A-F]{1,40}$")]
Der = Annotated[bytes, msgspec.Meta(min_length=1, max_length=8192)]
HexId = Annotated[str, msgspec.Meta(pattern="^[0-9A-F]{2,64}$")]
PersonId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Kinds = Annotated[list[CertType], msgspec.Meta(min_length=1, max_length=2)]

# Transient codes are worth retrying; every other failure is final for this saga.
TRANSIENT_ERRORS = frozenset({CaErrorCode.CA_KEY_UNAVAILABLE, CaErrorCode.INTERNAL})


class Failure(msgspec.Struct, frozen=True, kw_only=True):
    code: CaErrorCode
    detail: str = ""  # our own fixed wording: never data from the request, never a secret

    @property
    def transient(self) -> bool:
        return self.code in TRANSIENT_ERRORS


class CaCommand(msgspec.Struct, frozen=True, kw_only=True):
    command_id: CommandId


class CaReply(msgspec.Struct, frozen=True, kw_only=True):
    command_id: CommandId
    failure: Failure | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


# -- step 6: the card-signed application -----------------------------------------------------


@message_type("ca.cmd.verify_application")
class VerifyApplication(CaCommand, frozen=True, kw_only=True):
    se: SeIdentity  # the SE this saga works on (from phase 1, confirmed by the TSM)
    nonce: Annotated[bytes, msgspec.Meta(min_length=16, max_length=64)]  # the saga's nonce
    to_be_signed: Annotated[bytes, msgspec.Meta(min_length=2, max_length=4096)]
    signature: Annotated[bytes, msgspec.Meta(min_length=1, max_length=1024)]
    card_certificate: Der  # the card's signing certificate (EF 0001)


@message_type("ca.reply.verify_application")
class ApplicationVerified(CaReply, frozen=True, kw_only=True):
    person_id: PersonId | None = None
    card_serial: Serial | None = None
    certificates: list[CertType] = []
    pin_option: int | None = None


# -- step 7: phase-3 state check ---------------------------------------------------------------


@message_type("ca.cmd.state_check")
class StateCheckRequest(CaCommand, frozen=True, kw_only=True):
    pass


@message_type("ca.reply.state_check")
class StateCheckResult(CaReply, frozen=True, kw_only=True):
    branch: Branch | None = None
    revoke_now: list[Serial] = []
    release: list[Serial] = []
    revoke_after_success: list[Serial] = []
    old_se: list[HexId] = []


# -- step 9: issuance --------------------------------------------------------------------------


class PublicKeyProof(msgspec.Struct, frozen=True, kw_only=True):
    """A generated key as the TSM forwards it (same fields as the TSM's ``PublicKey``)."""

    kind: CertType
    public_key_der: Der  # SubjectPublicKeyInfo
    challenge: Annotated[bytes, msgspec.Meta(min_length=16, max_length=64)]
    proof: Annotated[bytes, msgspec.Meta(min_length=1, max_length=1024)]


@message_type("ca.cmd.issue")
class IssueCertificates(CaCommand, frozen=True, kw_only=True):
    public_keys: Annotated[list[PublicKeyProof], msgspec.Meta(min_length=1, max_length=2)]


class Certificate(msgspec.Struct, frozen=True, kw_only=True):
    kind: CertType
    serial: Serial
    certificate: Der
    ca_certificate: Der  # the issuing CA generation, for the CA-certificate EF
    not_after: datetime


@message_type("ca.reply.issue")
class CertificatesIssued(CaReply, frozen=True, kw_only=True):
    certificates: list[Certificate] = []


# -- life cycle: hold, release, revoke, card cascade -------------------------------------------


class Selection(msgspec.Struct, frozen=True, kw_only=True):
    """Which phone certificates: by serial, or every one (of ``kinds``) on an SE / of a person."""

    serials: list[Serial] = []
    se_cin: HexId | None = None
    person_id: PersonId | None = None
    kinds: Kinds = msgspec.field(default_factory=lambda: [CertType.AUTH, CertType.SIGN])


@message_type("ca.cmd.hold")
class Hold(CaCommand, frozen=True, kw_only=True):
    """Temporary loss: suspend (certificateHold)."""

    selection: Selection


@message_type("ca.cmd.release")
class Release(CaCommand, frozen=True, kw_only=True):
    """Found: lift the hold (only held certificates)."""

    selection: Selection


@message_type("ca.cmd.revoke")
class Revoke(CaCommand, frozen=True, kw_only=True):
    selection: Selection
    cause: Cause  # decides the RFC 5280 reason (docs/ca.md)


@message_type("ca.cmd.card_cascade")
class CardCertificateRevoked(CaCommand, frozen=True, kw_only=True):
    """A card certificate was revoked (move, marriage, renewal, loss, death): revoke it and,
    by cascade, the phone certificates issued from it."""

    card_serial: Serial
    cause: Cause


class StatusChange(msgspec.Struct, frozen=True, kw_only=True):
    serial: Serial
    kind: CertType
    holder: Holder
    status: Status
    reason: str | None = None  # RFC 5280 reason name when held or revoked
    changed: bool = True  # False: it already had this status (a repeated command)


@message_type("ca.reply.hold")
class HoldDone(CaReply, frozen=True, kw_only=True):
    changes: list[StatusChange] = []


@message_type("ca.reply.release")
class ReleaseDone(CaReply, frozen=True, kw_only=True):
    changes: list[StatusChange] = []


@message_type("ca.reply.revoke")
class RevokeDone(CaReply, frozen=True, kw_only=True):
    changes: list[StatusChange] = []


@message_type("ca.reply.card_cascade")
class CardCascadeDone(CaReply, frozen=True, kw_only=True):
    changes: list[StatusChange] = []


# -- life cycle: which phone certificates on an SE are not revoked (read only) ---------------


@message_type("ca.cmd.se_certificates")
class SeCertificatesQuery(CaCommand, frozen=True, kw_only=True):
    """Asked when a phone reconnects or confirms a disposal: what is still live on its SE."""

    se_cin: HexId


class LiveCertificate(msgspec.Struct, frozen=True, kw_only=True):
    serial: Serial
    kind: CertType
    person_id: PersonId
    status: Status  # valid or held
    certificate: Der


@message_type("ca.reply.se_certificates")
class SeCertificates(CaReply, frozen=True, kw_only=True):
    certificates: list[LiveCertificate] = []
