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

import asyncio
import hashlib
import hmac
import json
import os
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import msgspec
import structlog

from infra.db.outbox import outgoing
from infra.transport.base import Transport
from orchestrator import lifecycle_messages as lm
from orchestrator.lifecycle_messages import CallCentreRequest
from orchestrator.messages import SeIdentity
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


# ---------------------------------------------------------------------------------------
# ``jpki callcentre``: an operator's requests from the command line


def _phone_options(fn: Any) -> Any:
    for option in (
        click.option("--device-id", required=True, help="the phone's device id"),
        click.option("--cin", required=True, help="the phone SE's CIN (hex)"),
        click.option("--kdd", required=True, help="the phone SE's KDD (hex)"),
    ):
        fn = option(fn)
    return fn


async def _submit(amqp_url: str, operator: str, key: bytes, request: Any,
                  saga_id: str | None = None) -> str:
    from infra.transport.rabbitmq import RabbitMQTransport

    transport = RabbitMQTransport(amqp_url, connection_name="jpki-callcentre")
    await transport.connect()
    try:
        return await CallCentre(transport, operator, key).submit(request, saga_id=saga_id)
    finally:
        await transport.close()


@click.group("callcentre")
@click.option("--amqp-url", envvar="JPKI_AMQP_URL", required=True,
              help="RabbitMQ URL (env JPKI_AMQP_URL)")
@click.option("--operator", required=True, help="operator id the orchestrator knows")
@click.option("--key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="file holding the operator's HMAC key (hex)")
@click.pass_context
def callcentre_cli(ctx: click.Context, amqp_url: str, operator: str, key_file: Path) -> None:
    """Signed call-centre requests: loss, failure, temporary loss, found, card cascade."""
    ctx.obj = (amqp_url, operator, key_file)


def _fields(operator: str) -> dict[str, Any]:
    return {"request_id": uuid.uuid4().hex, "operator": operator, "issued_at": datetime.now(UTC)}


def _phone(device_id: str, cin: str, kdd: str) -> lm.Phone:
    return lm.Phone(device_id=device_id, se=SeIdentity(cin=cin.upper(), kdd=kdd.upper()))


def _send(ctx: click.Context, request: Any, saga_id: str | None = None) -> None:
    amqp_url, operator, key_file = ctx.obj
    key = bytes.fromhex(key_file.read_text().strip())
    sent = asyncio.run(_submit(amqp_url, operator, key, request, saga_id))
    click.echo(f"{type_of(request)[0]} sent: saga {sent}")


@callcentre_cli.command("loss")
@_phone_options
@click.pass_context
def loss_command(ctx: click.Context, device_id: str, cin: str, kdd: str) -> None:
    """Lost for good: revoke both; the applet goes when the phone next connects."""
    _send(ctx, lm.LossReport(**_fields(ctx.obj[1]), phone=_phone(device_id, cin, kdd)))


@callcentre_cli.command("failure")
@_phone_options
@click.pass_context
def failure_command(ctx: click.Context, device_id: str, cin: str, kdd: str) -> None:
    """Broken phone: revoke both."""
    _send(ctx, lm.FailureReport(**_fields(ctx.obj[1]), phone=_phone(device_id, cin, kdd)))


@callcentre_cli.command("temporary-loss")
@_phone_options
@click.pass_context
def temporary_loss_command(ctx: click.Context, device_id: str, cin: str, kdd: str) -> None:
    """Suspend both; revoked if not found within the set period."""
    _send(ctx, lm.TemporaryLossReport(**_fields(ctx.obj[1]), phone=_phone(device_id, cin, kdd)))


@callcentre_cli.command("found")
@_phone_options
@click.option("--temporary-loss-id", required=True, help="saga id of the temporary loss")
@click.pass_context
def found_command(ctx: click.Context, device_id: str, cin: str, kdd: str,
                  temporary_loss_id: str) -> None:
    """Found: release auth, revoke and reissue sign (the user renews on the phone)."""
    report = lm.FoundReport(**_fields(ctx.obj[1]), phone=_phone(device_id, cin, kdd),
                            temporary_loss_id=temporary_loss_id)
    _send(ctx, report, saga_id=temporary_loss_id)  # stops the not-found timer
    _send(ctx, report)


@callcentre_cli.command("card-cascade")
@click.option("--card-serial", required=True, help="serial of the card's signing certificate")
@click.option("--renewed", is_flag=True, help="the card was renewed (both phone certificates)")
@click.pass_context
def card_cascade_command(ctx: click.Context, card_serial: str, renewed: bool) -> None:
    """A card certificate was revoked: the phone certificates follow."""
    _send(ctx, lm.CardCascadeReport(**_fields(ctx.obj[1]), card_serial=card_serial.upper(),
                                    renewed=renewed))
