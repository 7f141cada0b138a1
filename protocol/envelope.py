"""The typed, versioned message envelope every service speaks (JSON on the wire).

Body types register themselves with ``@message_type("name", version)`` in the schema
module of the service that owns them (``workers/tsm/messages.py`` and so on). Decoding
never raises anything but ``InvalidMessage``/``UnknownMessageType`` so that a consumer can
park a bad message with its reason instead of crashing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec

from protocol.errors import JpkiError


class InvalidMessage(JpkiError):
    """Bytes that are not a valid envelope, or a body that does not match its schema."""

    remote_fault = True


class UnknownMessageType(InvalidMessage):
    """A well-formed envelope whose (type, schema_version) nobody registered."""


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    message_id: str
    type: str
    schema_version: int
    sent_at: datetime
    saga_id: str | None = None  # the correlation id: the saga this message belongs to
    causation_id: str | None = None  # message_id of the message that caused this one
    device_id: str | None = None
    deadline: datetime | None = None
    reply_to: str | None = None  # routing key for the answer, when it is not the default
    body: msgspec.Raw = msgspec.Raw(b"{}")


class Message(msgspec.Struct, frozen=True):
    envelope: Envelope
    body: Any


B = TypeVar("B", bound=type)
_REGISTRY: dict[tuple[str, int], type] = {}
_NAMES: dict[type, tuple[str, int]] = {}


def message_type(name: str, version: int = 1) -> Callable[[B], B]:
    """Register a body Struct under a wire name and schema version."""

    def register(cls: B) -> B:
        key = (name, version)
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"message type {name} v{version} registered twice")
        _REGISTRY[key] = cls
        _NAMES[cls] = key
        return cls

    return register


def type_of(body: object) -> tuple[str, int]:
    try:
        return _NAMES[type(body)]
    except KeyError:
        raise UnknownMessageType(f"{type(body).__name__} is not a registered message") from None


_encoder = msgspec.json.Encoder()
_envelope_decoder = msgspec.json.Decoder(Envelope)
_body_decoders: dict[type, msgspec.json.Decoder[Any]] = {}


def time_ordered_id() -> str:
    """32 hex digits in UUIDv7's layout (RFC 9562 §5.7): 48 bits of Unix time in
    milliseconds, the version, 74 random bits. Ids made close in time sort close together,
    so the indexes they key (inbox, outbox, sagas and their timeline) take a batch's new
    rows on a few pages instead of a random page each, and a commit writes fewer pages.
    Embedded issuance bench, ten alternated pairs against random ids: 131.5 → 134.8/s
    (medians). No UUID object: ids are made for every message."""
    value = time.time_ns() // 1_000_000 << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # variant 10
    return f"{value:032x}"


new_message_id = time_ordered_id


def build(
    body: object,
    *,
    saga_id: str | None = None,
    causation_id: str | None = None,
    device_id: str | None = None,
    deadline: datetime | None = None,
    reply_to: str | None = None,
    message_id: str | None = None,
    sent_at: datetime | None = None,
) -> Message:
    name, version = type_of(body)
    envelope = Envelope(
        message_id=message_id or new_message_id(),
        type=name,
        schema_version=version,
        sent_at=sent_at or datetime.now(UTC),
        saga_id=saga_id,
        causation_id=causation_id,
        device_id=device_id,
        deadline=deadline,
        reply_to=reply_to,
        body=msgspec.Raw(_encoder.encode(body)),
    )
    return Message(envelope, body)


def encode(message: Message) -> bytes:
    return _encoder.encode(message.envelope)


def decode(raw: bytes) -> Message:
    try:
        envelope = _envelope_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise InvalidMessage(f"not a valid envelope: {exc}") from None
    cls = _REGISTRY.get((envelope.type, envelope.schema_version))
    if cls is None:
        raise UnknownMessageType(
            f"unknown message type {envelope.type!r} v{envelope.schema_version}"
        )
    decoder = _body_decoders.get(cls)
    if decoder is None:
        decoder = _body_decoders[cls] = msgspec.json.Decoder(cls)
    try:
        body = decoder.decode(envelope.body)
    except msgspec.DecodeError as exc:
        raise InvalidMessage(f"{envelope.type} v{envelope.schema_version}: {exc}") from None
    return Message(envelope, body)
