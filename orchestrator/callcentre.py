"""The operator / call-centre API: authenticated requests that start life-cycle sagas.

A request (``orchestrator/lifecycle_messages.py``: loss, failure, temporary loss, found,
card cascade) is signed by the operator with HMAC-SHA256 under a key the orchestrator
shares with that operator::

    mac = HMAC-SHA256(key[operator], type ‖ 0x00 ‖ JSON(request with mac = 32 zero bytes))

It travels as ``callcentre.cmd.<op>`` to the ``orchestrator`` queue and starts a saga whose
id is ``request_id`` (a re-sent request lands on the same saga). The saga's first step,
``authenticate``, checks the MAC (constant-time), the operator and the age of the request
(``MAX_AGE_S``, against the saga's injected clock) before anything else is done; a request
that fails ends the saga with nothing changed.

``CallCentre`` is the operator side: it signs and publishes requests on any transport.
Keys: ``OperatorKeys`` (never in a repr or a log line), loaded from a JSON file
``{"operator": "<hex key>"}`` named by ``JPKI_OPERATOR_KEYS_FILE``, or installed with
``configure`` (tests, ``jpki run``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import structlog

from infra.db.outbox import outgoing
from infra.transport.base import Transport
from orchestrator.lifecycle_messages import CallCentreRequest
from protocol.envelope import build, type_of
from protocol.errors import JpkiError

log = structlog.get_logger("callcentre")

MAX_AGE_S = 15 * 60.0  # a request older than this (or from the future) is refused
_ZERO_MAC = b"\0" * 32


class NotAuthenticated(JpkiError):
    """A call-centre request without a valid MAC from a known operator, or too old."""


class OperatorKeys:
    """Operator id → HMAC key. Redacted everywhere."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        if any(len(k) < 16 for k in keys.values()):
            raise NotAuthenticated("operator keys must be at least 16 bytes")
        self._keys = dict(keys)

    @classmethod
    def from_file(cls, path: Path) -> OperatorKeys:
        raw = json.loads(path.read_text())
        return cls({str(name): bytes.fromhex(str(value)) for name, value in raw.items()})

    def key(self, operator: str) -> bytes | None:
        return self._keys.get(operator)

    def __repr__(self) -> str:
        return f"OperatorKeys({len(self._keys)} operators, redacted)"

    __str__ = __repr__


def _from_environment() -> OperatorKeys:
    path = os.environ.get("JPKI_OPERATOR_KEYS_FILE")
    return OperatorKeys.from_file(Path(path)) if path else OperatorKeys({})


_keys: OperatorKeys | None = None


def configure(keys: OperatorKeys) -> None:
    """Install the operator keys the orchestrator checks requests with."""
    global _keys
    _keys = keys


def operator_keys() -> OperatorKeys:
    global _keys
    if _keys is None:
        _keys = _from_environment()
    return _keys


def signed_bytes(request: CallCentreRequest) -> bytes:
    unsigned = msgspec.structs.replace(request, mac=_ZERO_MAC)
    return type_of(request)[0].encode() + b"\0" + msgspec.json.encode(unsigned)


def mac_of(request: CallCentreRequest, key: bytes) -> bytes:
    return hmac.new(key, signed_bytes(request), hashlib.sha256).digest()


def sign(request: CallCentreRequest, key: bytes) -> Any:
    return msgspec.structs.replace(request, mac=mac_of(request, key))


def authenticate(request: CallCentreRequest, now: float) -> None:
    """Raise ``NotAuthenticated`` unless a known operator signed exactly this request lately."""
    key = operator_keys().key(request.operator)
    if key is None:
        raise NotAuthenticated("unknown operator")
    if not hmac.compare_digest(mac_of(request, key), request.mac):
        raise NotAuthenticated("bad MAC")
    age = now - request.issued_at.timestamp()
    if not -60.0 <= age <= MAX_AGE_S:
        raise NotAuthenticated("request too old or from the future")
    log.info("callcentre.authenticated", operator=request.operator,
             request_id=request.request_id, type=type_of(request)[0])


class CallCentre:
    """The operator's side: sign a request and publish it to the orchestrator."""

    def __init__(self, transport: Transport, operator: str, key: bytes) -> None:
        self._transport = transport
        self.operator = operator
        self._key = key

    def __repr__(self) -> str:
        return f"CallCentre({self.operator}, key redacted)"

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def submit(self, request: CallCentreRequest, *, saga_id: str | None = None) -> str:
        """Publish ``request`` signed; returns the saga id it starts (or reaches)."""
        signed = sign(request, self._key)
        target = saga_id or request.request_id
        message = build(signed, saga_id=target, message_id=f"{target}:{request.request_id}")
        await self._transport.publish([outgoing(message)])
        return target
