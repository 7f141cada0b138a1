"""Messages between the UI app on a phone and the orchestrator.

Routing (every transport): the phone publishes ``app.event.*`` on its MQTT up topic and the
gateway republishes them on AMQP by type, where the ``orchestrator`` queue binds
``app.event.#``. Messages *to* a phone are published with routing key ``device.<device_id>``
(MQTT topic ``jpki/dev/<device_id>/down``); their types are ``app.cmd.*``, the prefix
``infra.bus`` knows as phone-bound.

The saga an event belongs to travels in the envelope's ``saga_id``; an issuance saga's id is
the ``application_id`` the app chose for its enrolment, so a redelivered or re-sent
enrolment lands on the same saga.

What never appears here: the user's PINs, the card's signing password and the temporary
PINs. The temporary PINs travel only on the TSM → app path (``workers/tsm/messages.py``);
the orchestrator's go-ahead for local PIN setting says when to use them, not what they are.

New issuance (FLOWS.md §1), message by message::

    app  ── app.event.enrolment ──────────────▶ orchestrator   step 1 (phase 1)
    app  ◀─ app.cmd.card_signature ─────────── orchestrator   step 5 (phase 3 starts)
    app  ── app.event.card_signature ─────────▶ orchestrator   steps 5 → 6
    app  ◀─ (TSM: temporary PINs) ──────────── tsm            step 11
    app  ◀─ app.cmd.pin_setting ────────────── orchestrator   step 11 → 12
    app  ── app.event.pins_set ───────────────▶ orchestrator   step 12 → 13
    app  ◀─ app.cmd.result ─────────────────── orchestrator   phase 4, or why not
    app  ── app.event.aborted ────────────────▶ orchestrator   any time: user or card gave up
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Annotated, Literal

import msgspec

from protocol.envelope import message_type
from protocol.jpki import PinOption

# ---------------------------------------------------------------------------------------
# Shared vocabulary


class CertificateKind(enum.StrEnum):
    """The two phone certificates (DOMAIN.md §2); the user picks one or both."""

    AUTH = "auth"  # user authentication (利用者証明用): key EF 0017, PIN EF 0018
    SIGN = "sign"  # digital signature (署名用): key EF 001A, password EF 001B


DEFAULT_PIN_OPTION = PinOption.INITIAL_STATE

HexId = Annotated[str, msgspec.Meta(pattern="^[0-9A-F]{2,64}$")]
DeviceId = Annotated[str, msgspec.Meta(pattern="^[A-Za-z0-9_-]{1,64}$")]
ApplicationId = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]
Nonce = Annotated[bytes, msgspec.Meta(min_length=16, max_length=64)]
Certificates = Annotated[list[CertificateKind], msgspec.Meta(min_length=1, max_length=2)]


class SeIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """Who the secure element is (GP card data): what the TSM diversifies its keys from."""

    cin: HexId  # Card Image Number, upper-case hex
    kdd: HexId  # Key Diversification Data, upper-case hex


class Outcome(enum.StrEnum):
    ISSUED = "issued"  # phase 4 reached: certificates active, PINs set
    REFUSED = "refused"  # not eligible (phone, card or person); nothing was changed
    FAILED = "failed"  # a step failed or timed out; compensations have undone what was done
    CANCELLED = "cancelled"  # the user or the app gave up; compensations as for FAILED


class Reason(enum.StrEnum):
    """Why an issuance did not reach phase 4. A code, never exception text (no secret leaks)."""

    UNSUPPORTED_MODEL = "unsupported_model"
    UNSUPPORTED_OS = "unsupported_os"
    NO_SECURE_ELEMENT = "no_secure_element"
    BAD_APPLICATION = "bad_application"  # malformed enrolment (duplicate certificates, …)
    BAD_CARD_SIGNATURE = "bad_card_signature"
    CARD_CERTIFICATE_INVALID = "card_certificate_invalid"  # chain or validity
    CARD_CERTIFICATE_REVOKED = "card_certificate_revoked"  # §3: renew the card first
    CARD_CERTIFICATE_EXPIRED = "card_certificate_expired"  # §3: renew the card first
    SE_ERROR = "se_error"  # the secure element refused a TSM script
    ISSUANCE_REFUSED = "issuance_refused"  # the CA refused to issue
    PIN_SETTING_FAILED = "pin_setting_failed"
    TIMEOUT = "timeout"  # a step did not answer before its deadline
    USER_CANCELLED = "user_cancelled"
    CARD_PASSWORD_BLOCKED = "card_password_blocked"  # noqa: S105 - a reason code, not a secret
    CARD_NOT_READ = "card_not_read"
    INTERNAL = "internal"


# ---------------------------------------------------------------------------------------
# app → orchestrator (app.event.*)


@message_type("app.event.enrolment", 1)
class Enrolment(msgspec.Struct, frozen=True, kw_only=True):
    """Phase 1 done: the app reports the phone and what the user applied for (step 1).

    Starts a new-issuance saga whose id is ``application_id``.
    """

    application_id: ApplicationId
    device_id: DeviceId
    app_instance_id: ApplicationId  # new on every (re)install of the app
    model: Annotated[str, msgspec.Meta(max_length=64)]
    os_name: Annotated[str, msgspec.Meta(max_length=32)]
    os_version: Annotated[str, msgspec.Meta(max_length=32)]
    se_present: bool
    se: SeIdentity | None = None  # None when the phone has no usable SE
    certificates: Certificates
    pin_option: PinOption = DEFAULT_PIN_OPTION

    def __post_init__(self) -> None:
        # msgspec turns this into a decode error, so a bad enrolment is parked, not run
        if len(set(self.certificates)) != len(self.certificates):
            raise ValueError("certificates must not repeat")


@message_type("app.event.card_signature", 1)
class CardSignature(msgspec.Struct, frozen=True, kw_only=True):
    """The My Number Card signed the application (step 5). Never the card's password."""

    nonce: Nonce  # echoes the request's nonce
    signature: Annotated[bytes, msgspec.Meta(max_length=1024)]  # PKCS#1 v1.5 (RSA-2048)
    card_certificate: Annotated[bytes, msgspec.Meta(max_length=8192)]  # DER, EF 0001 of the card


@message_type("app.event.pins_set", 1)
class PinsSet(msgspec.Struct, frozen=True, kw_only=True):
    """Step 12 done: the temporary PIN(s) were verified and changed to the user's on the SE.

    Says *which* PINs were set, never what they are.
    """

    certificates: Certificates


class AbortStage(enum.StrEnum):
    CARD_SIGNATURE = "card_signature"
    PIN_SETTING = "pin_setting"
    OTHER = "other"


@message_type("app.event.aborted", 1)
class Aborted(msgspec.Struct, frozen=True, kw_only=True):
    """The app gives up on this saga: the user cancelled, the card was not read, the card's
    password is blocked, or local PIN setting failed (the SE's status word says why)."""

    stage: AbortStage
    reason: Reason
    status_word: Annotated[int, msgspec.Meta(ge=0, le=0xFFFF)] | None = None


@message_type("app.event.online", 1)
class Online(msgspec.Struct, frozen=True, kw_only=True):
    """The app (re)connected. Lets the backend finish work that waited for this phone, such as
    deleting the applet of a phone whose certificates moved to a new model."""

    device_id: DeviceId
    app_instance_id: ApplicationId
    se: SeIdentity | None = None


# ---------------------------------------------------------------------------------------
# orchestrator → app (routing key device.<device_id>)


class Application(msgspec.Struct, frozen=True, kw_only=True):
    """What the My Number Card signs at step 5: the identity proof for this application.

    ``to_be_signed`` gives the exact bytes; the app shows the fields to the user and checks
    that the bytes encode them before the card signs.
    """

    application_id: ApplicationId
    nonce: Nonce  # fresh per saga, from the orchestrator's injected randomness
    device_id: DeviceId
    app_instance_id: ApplicationId
    se: SeIdentity
    certificates: Certificates
    requested_at: datetime
    pin_option: PinOption | None = None

    def to_be_signed(self) -> bytes:
        """Canonical bytes: JSON with fields in declaration order, certificates sorted."""
        canonical = msgspec.structs.replace(self, certificates=sorted(set(self.certificates)))
        return _canonical_encoder.encode(canonical)


_canonical_encoder = msgspec.json.Encoder()


@message_type("app.cmd.card_signature", 1)
class CardSignatureRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Step 5: ask the user for the card's signing password and have the card sign
    SHA-256 of ``application.to_be_signed()`` (PKCS#1 v1.5 DigestInfo, EF 001A)."""

    application: Application
    digest: Literal["sha256"] = "sha256"


@message_type("app.cmd.pin_setting", 1)
class PinSettingGoAhead(msgspec.Struct, frozen=True, kw_only=True):
    """Step 11 → 12: the TSM has released the PIN(s); set them locally now.

    The temporary PIN(s) come in the TSM's own message to the app, which may arrive just
    before or just after this one: the app waits for both.
    """

    certificates: Certificates
    pin_option: PinOption


@message_type("app.cmd.result", 1)
class Result(msgspec.Struct, frozen=True, kw_only=True):
    """The end of the saga as the app shows it."""

    outcome: Outcome
    phase: Annotated[int, msgspec.Meta(ge=1, le=4)]  # phase the phone is in now
    certificates: list[CertificateKind] = []  # active after this saga
    reason: Reason | None = None
    model_change: bool = False  # the person's previous phone was retired by this saga
