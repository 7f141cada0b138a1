"""PC/SC bridge: a simulated card served to ``pcscd`` through the vsmartcard virtual reader.

The ``vpcd`` reader driver of vsmartcard listens on TCP (port 35963 by default) for one
virtual card. Each message, both ways, is a 2-byte big-endian length and a payload. A
1-byte payload from the reader is a control code (0 power off, 1 power on, 2 reset,
4 "send your ATR"); anything longer is a command APDU, answered by the response APDU.
Only the ATR request and APDUs get an answer.

``handle_message`` is the pure part; ``serve`` is the thin asyncio shell that keeps the
card connected (and reconnects when ``pcscd`` restarts) until told to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import click
import structlog

from device_sim.card import (
    SAMPLE_HOLDER,
    CardIssuer,
    MyNumberCard,
    TestCardCa,
    manufacture_card,
)
from device_sim.se.jpki_applet import JpkiApplet, Profile
from protocol import jpki
from protocol.apdu import CommandAPDU
from protocol.errors import JpkiError, MalformedAPDU

if TYPE_CHECKING:
    from device_sim.se.element import SecureElement

log = structlog.get_logger(__name__)

DEFAULT_PORT = 35963


class VpcdControl(enum.IntEnum):
    POWER_OFF = 0
    POWER_ON = 1
    RESET = 2
    GET_ATR = 4


class VirtualCard(Protocol):
    atr: bytes

    def reset(self) -> bytes: ...

    def transmit(self, apdu: bytes) -> bytes: ...


class VpcdProtocolError(JpkiError):
    remote_fault = True


def frame(payload: bytes) -> bytes:
    if len(payload) > 0xFFFF:
        raise VpcdProtocolError("vpcd payload longer than 65535 bytes")
    return struct.pack(">H", len(payload)) + payload


def handle_message(card: VirtualCard, payload: bytes) -> bytes | None:
    """One message from the reader; the answer to send back, or None."""
    if not payload:
        raise VpcdProtocolError("empty vpcd message")
    if len(payload) == 1:
        try:
            control = VpcdControl(payload[0])
        except ValueError:
            log.warning("vpcd.unknown_control", code=payload[0])
            return None
        if control is VpcdControl.GET_ATR:
            return card.atr
        card.reset()  # power off, power on and reset all leave the card freshly reset
        log.debug("vpcd.control", control=control.name)
        return None
    response = card.transmit(payload)
    _trace(payload, response)
    return response


def _trace(command: bytes, response: bytes) -> None:
    # Header and status word only: command data may be a PIN.
    try:
        header = repr(CommandAPDU.from_bytes(command))
    except MalformedAPDU:
        header = f"malformed ({len(command)} bytes)"
    log.debug("vpcd.apdu", command=header, sw=response[-2:].hex().upper(),
              response_bytes=len(response) - 2)


def _ack_quickly(writer: asyncio.StreamWriter) -> None:
    """Re-arm TCP_QUICKACK (Linux resets it after each ACK).

    The vpcd driver sends the length and the payload in two writes; with Nagle on its side
    and delayed ACKs on ours every APDU would wait about 40 ms for our ACK.
    """
    sock = writer.get_extra_info("socket")
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if sock is not None and quickack is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)


async def _serve_connection(
    card: VirtualCard, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        _ack_quickly(writer)
        length = struct.unpack(">H", await reader.readexactly(2))[0]
        _ack_quickly(writer)
        payload = await reader.readexactly(length)
        answer = handle_message(card, payload)
        if answer is not None:
            writer.write(frame(answer))
            await writer.drain()


async def serve(
    card: VirtualCard,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    stop: asyncio.Event | None = None,
    retry_delay: float = 0.5,
    on_connected: Callable[[], None] | None = None,
) -> None:
    """Keep ``card`` inserted in the virtual reader until ``stop`` is set."""
    stop = stop or asyncio.Event()
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            log.debug("vpcd.connect_failed", host=host, port=port)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), retry_delay)
            continue
        log.info("vpcd.connected", host=host, port=port)
        if on_connected:
            on_connected()
        session = asyncio.ensure_future(_serve_connection(card, reader, writer))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({session, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not session.done():
            session.cancel()
        with contextlib.suppress(asyncio.CancelledError, asyncio.IncompleteReadError,
                                 ConnectionError, VpcdProtocolError):
            await session
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        card.reset()
        log.info("vpcd.disconnected")


# --- what gets served ------------------------------------------------------------------------


class SecureElementInReader:
    """A phone's secure element put in a PC/SC reader: the card manager answers, and routes
    SELECT of the JPKI AID and everything after it to the applet, as on the phone."""

    def __init__(self, element: SecureElement, atr: bytes) -> None:
        self.element = element
        self.atr = atr

    def reset(self) -> bytes:
        self.element.manager.reset()
        return self.atr

    def transmit(self, apdu: bytes) -> bytes:
        return self.element.transmit(apdu)


def personalised_phone_element(
    issuer: CardIssuer, pin: str, sign_password: str, random_bytes: Callable[[int], bytes]
) -> tuple[SecureElementInReader, JpkiApplet]:
    """A phone SE as the SP-TSM leaves it after a new issuance, PINs set by the user.

    Install, key generation and certificate storage run as the SP-TSM's own SCP03 scripts
    (one round trip each); the user's PINs are then set locally, VERIFY of the temporary PIN
    and CHANGE REFERENCE DATA in clear, as the app does.
    """
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    from device_sim.card import CardCertificateRequest
    from device_sim.se.jpki_applet import JpkiAppletFactory
    from protocol.apdu import ResponseAPDU
    from workers.tsm import scripts
    from workers.tsm.keys import MasterKeyRing, MasterKeys
    from workers.tsm.provisioning import manufacture_secure_element

    kvn = 0x01
    ring = MasterKeyRing({kvn: MasterKeys.generate(kvn, random_bytes=random_bytes)}, kvn)
    cin = random_bytes(10)
    element = manufacture_secure_element(ring, cin, JpkiAppletFactory(Profile.PHONE),
                                         random=random_bytes)
    access = scripts.SeAccess(ring.current_keys.static_keys_for(cin), kvn, cin)

    def run(plan: scripts.OperationPlan) -> list[ResponseAPDU]:
        session = scripts.ScriptSession(plan, access, random=random_bytes)
        counter = element.manager.domains[scripts.SP_SD_AID].sequence_counter + 1
        wire = session.offline_script(counter)
        return session.verify_offline([element.transmit(step.apdu) for step in wire])

    kinds = (scripts.CertificateKind.AUTH, scripts.CertificateKind.SIGN)
    run(scripts.plan_install())
    challenges = [random_bytes(32) for _ in kinds]
    answers = run(scripts.plan_generate_keys(kinds, "vpcd-phone", challenges))
    auth, sign = (
        scripts.interpret_generated_key(kind, challenge, answer)
        for kind, challenge, answer in zip(kinds, challenges, answers[1:], strict=True)
    )
    auth_key, sign_key = (load_der_public_key(k.public_key_der) for k in (auth, sign))
    if not isinstance(auth_key, rsa.RSAPublicKey) or not isinstance(sign_key, rsa.RSAPublicKey):
        raise VpcdProtocolError("the applet generated a key that is not RSA")
    certificates = issuer(CardCertificateRequest(SAMPLE_HOLDER, auth_key, sign_key))
    temporary = {
        scripts.CertificateKind.AUTH: f"{int.from_bytes(random_bytes(2), 'big') % 10_000:04d}",
        scripts.CertificateKind.SIGN: random_bytes(6).hex().upper(),
    }
    run(scripts.plan_store_certificates(
        [(kinds[0], certificates.auth_certificate, certificates.auth_ca_certificate),
         (kinds[1], certificates.sign_certificate, certificates.sign_ca_certificate)],
        jpki.TemporaryPinMode.USABLE,
        [scripts.TemporaryPinValue(kind, value) for kind, value in temporary.items()],
    ))
    for kind, final in ((kinds[0], pin), (kinds[1], sign_password)):
        for command in (jpki.select_ap(), jpki.select_ef(scripts.PIN_EF[kind]),
                        jpki.verify(temporary[kind].encode()),
                        jpki.change_reference_data(final.encode())):
            jpki.expect_ok(ResponseAPDU.from_bytes(element.transmit(command.to_bytes())),
                           "local PIN setting")
    applet = element.manager.applications[jpki.AID].applet
    if not isinstance(applet, JpkiApplet):
        raise VpcdProtocolError("the installed applet is not the JPKI applet")
    reader = SecureElementInReader(element, jpki.CARD_ATR)
    reader.reset()
    return reader, applet


# --- CLI: jpki card serve --vpcd -------------------------------------------------------------


@click.group("card")
def card_cli() -> None:
    """The simulated My Number Card (and a phone's JPKI applet) for real PC/SC tools."""


@card_cli.command("serve")
@click.option("--vpcd", "use_vpcd", is_flag=True, required=True,
              help="Serve through the vsmartcard virtual reader (the only bridge so far).")
@click.option("--phone", is_flag=True, help="Serve a phone's JPKI applet instead of a card.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Where vpcd listens.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int)
@click.option("--pin", default="1234", show_default=True,
              help="User-authentication PIN (4 digits).")
@click.option("--sign-password", default="ABC123", show_default=True,
              help="Signing password (6-16 of A-Z, 0-9).")
@click.option("--ca-dir", type=click.Path(file_okay=False),
              help="Have the certificates issued (and recorded) by the JPKI CA kept in this "
                   "directory (passphrase from JPKI_CA_PASSPHRASE[_FILE]); default: a "
                   "throw-away test card CA.")
@click.option("--export-certificates", type=click.Path(file_okay=False),
              help="Also write the four certificates (DER) into this directory.")
@click.option("--verbose", is_flag=True, help="Log every APDU header and status word.")
def serve_command(
    use_vpcd: bool, phone: bool, host: str, port: int, pin: str, sign_password: str,
    ca_dir: str | None, export_certificates: str | None, verbose: bool,
) -> None:
    """Personalise a fresh simulated card and serve it to pcscd until stopped (Ctrl-C)."""
    import logging

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.DEBUG if verbose else logging.INFO
        )
    )
    for rule, value in ((jpki.AUTH_PIN_RULE, pin), (jpki.SIGN_PIN_RULE, sign_password)):
        try:
            rule.check(value)
        except jpki.InvalidPin as exc:
            raise click.BadParameter(str(exc)) from None
    if phone and ca_dir:
        raise click.UsageError("--ca-dir issues card certificates; a phone's come from an "
                               "issuance saga (jpki run)")
    card: VirtualCard
    if ca_dir:
        card = asyncio.run(_manufacture_with_system_ca(Path(ca_dir), pin, sign_password))
        applet = card.applet
    elif phone:
        card, applet = personalised_phone_element(_test_ca(), pin, sign_password, os.urandom)
    else:
        card = manufacture_card(SAMPLE_HOLDER, _test_ca(), auth_pin=pin,
                                sign_password=sign_password)
        applet = card.applet
    if export_certificates:
        out = Path(export_certificates)
        out.mkdir(parents=True, exist_ok=True)
        for ef in jpki.CERTIFICATE_EFS:
            (out / f"{ef:04X}.der").write_bytes(applet.files[ef])
    what = "phone's secure element with its JPKI applet" if phone else "My Number Card"

    def connected() -> None:
        click.echo(f"serving a {what} on vpcd {host}:{port} (Ctrl-C to stop)")

    try:
        asyncio.run(serve(card, host=host, port=port, on_connected=connected))
    except KeyboardInterrupt:
        click.echo("stopped")


def _test_ca() -> TestCardCa:
    return TestCardCa(now=lambda: dt.datetime.now(dt.UTC))


async def _manufacture_with_system_ca(ca_dir: Path, pin: str, sign_password: str) -> MyNumberCard:
    """A card whose certificates the JPKI CA issued and recorded, so it verifies them later."""
    import uuid

    from device_sim.fleet import CaCardFactory
    from workers.ca.authority import CertificateAuthority
    from workers.ca.keystore import Passphrase

    authority = await CertificateAuthority.open(ca_dir, Passphrase.from_environment())
    try:
        factory = CaCardFactory(authority)
        card = manufacture_card(
            SAMPLE_HOLDER, factory.issuer_for(f"vpcd-{uuid.uuid4().hex[:12]}"), auth_pin=pin,
            sign_password=sign_password,
        )
        await factory.record()
    finally:
        await authority.close()
    return card
