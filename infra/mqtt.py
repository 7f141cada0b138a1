"""The MQTT link between phones and the gateway (aiomqtt, MQTT 3.1.1, QoS 1).

Topics: one pair per device, ``jpki/dev/<device_id>/down`` (back end to phone) and
``jpki/dev/<device_id>/up`` (phone to back end). Gateways subscribe to every up topic
through the shared subscription ``$share/jpki-gateway/jpki/dev/+/up``, so the broker
hands each message to one gateway of the group. (Mosquitto spreads a shared
subscription's messages over the group one by one, so two up messages of one device
may cross two gateways; every up message answers a command the back end awaits, and
handlers are idempotent, so nothing relies on up-path order across gateways.)

``MqttSession`` is one client session that survives the network: a stable client id with
``clean_session=False`` (the broker keeps the subscriptions and queues QoS 1 messages
while we are away and resends what we had not acknowledged), reconnection with
exponential backoff and jitter, publishes that wait for the broker's PUBACK and are
retried across reconnects, and incoming messages acknowledged only after they were
handled (paho's manual ack): a process that dies mid-handling gets the message again.
PUBACKs go out in the order the messages came (MQTT 3.1.1 §4.6), even when handling is
pipelined.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import os
import random
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import paho.mqtt.client as mqtt
import structlog

from infra.bus import InvalidDeviceId, RetryBackoff, check_device_id, check_from_phone
from infra.transport.base import TransportError
from infra.transport.phone_link import DownHandler, PhoneLink, deliver_down
from protocol.envelope import Message, encode

log = structlog.get_logger(__name__)

TOPIC_ROOT = "jpki/dev"  # a deployment (or a test) may choose another root
GATEWAY_SHARE_GROUP = "jpki-gateway"
QOS = 1
# A broker with per-device ACLs (username = device id) wants each phone to log in with its
# own password. The simulated phones derive theirs from one provisioning secret, the file
# named by this variable; the deployment writes the broker's password file from it.
PHONE_SECRET_FILE_ENV = "JPKI_MQTT_PHONE_SECRET_FILE"  # noqa: S105 - a variable's name

# A handler returns a coroutine (run as a task when pipelined) or a future it completes
# itself, which saves the task: the gateway's up path hands each message to a batch.
RawHandler = Callable[[mqtt.MQTTMessage], Awaitable[None]]


class _SocketWriter:
    """paho's socket-write callbacks for a client the event loop drives.

    Every packet paho queues asks for a write. aiomqtt answers each by adding a writer
    callback through ``call_soon_threadsafe`` and removing it once written: two wake-ups
    of the loop's self-pipe and two epoll changes a packet, more system calls than the
    packet's own ``send``. Here the packets queued during one loop round are written at
    its end, straight from the loop; only a socket that cannot take them all gets a
    writer callback until it drains."""

    def __init__(self, client: aiomqtt.Client, loop: asyncio.AbstractEventLoop) -> None:
        self._client = client
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._scheduled = False
        self._watched: int | None = None  # the socket's descriptor while a writer waits

    def register(self, _paho: Any, _userdata: Any, _sock: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            self._schedule()
        else:  # paho's connect runs in an executor thread
            self._loop.call_soon_threadsafe(self._schedule)

    def unregister(self, _paho: Any, _userdata: Any, _sock: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            self._unwatch()
        else:
            self._loop.call_soon_threadsafe(self._unwatch)

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._write)

    def _write(self) -> None:
        self._scheduled = False
        paho = self._client._client
        try:
            paho.loop_write()
        except Exception as exc:  # a broken pipe: the connection is gone
            if not self._client._disconnected.done():
                self._client._disconnected.set_exception(exc)
            return
        sock = paho.socket()
        if paho.want_write() and self._watched is None and sock is not None:
            self._watched = sock.fileno()
            self._loop.add_writer(self._watched, self._write)

    def _unwatch(self) -> None:
        if self._watched is not None:
            self._loop.remove_writer(self._watched)
            self._watched = None


class _Inbox:
    """What paho received on one connection, for the session's receive loop, as paho's
    own message objects: aiomqtt's message iterator costs a task and an ``asyncio.wait``
    a message, and its ``Message`` a copy with a validated ``Topic``."""

    def __init__(self) -> None:
        self._messages: deque[mqtt.MQTTMessage] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._lost: BaseException | None = None

    def __len__(self) -> int:
        return len(self._messages)

    def put(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        """paho's ``on_message``."""
        self._messages.append(message)
        self._wake()

    def lose(self, disconnected: asyncio.Future[None]) -> None:
        """The connection ended (aiomqtt's ``_disconnected`` future is done)."""
        failure = None if disconnected.cancelled() else disconnected.exception()
        self._lost = failure or aiomqtt.MqttError("disconnected")
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> mqtt.MQTTMessage:
        while not self._messages:
            if self._lost is not None:
                raise aiomqtt.MqttError("Disconnected during message iteration") from self._lost
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._messages.popleft()


def down_topic(device_id: str, root: str = TOPIC_ROOT) -> str:
    return f"{root}/{check_device_id(device_id)}/down"


def up_topic(device_id: str, root: str = TOPIC_ROOT) -> str:
    return f"{root}/{check_device_id(device_id)}/up"


def shared_up_topics(root: str = TOPIC_ROOT, group: str = GATEWAY_SHARE_GROUP) -> str:
    """Every device's up topic, shared among the gateways of ``group``."""
    return f"$share/{group}/{root}/+/up"


def device_of(topic: str, root: str = TOPIC_ROOT) -> str:
    """The device id of a ``<root>/<id>/up|down`` topic (``InvalidDeviceId`` if not)."""
    prefix = root + "/"
    device, _, direction = topic.removeprefix(prefix).partition("/")
    if not topic.startswith(prefix) or direction not in ("up", "down"):
        raise InvalidDeviceId("not a device topic")
    return check_device_id(device)


def phone_password(secret: bytes, device_id: str) -> str:
    """The MQTT password of ``device_id``: HMAC-SHA256 of its id under the secret."""
    digest = hmac.new(secret, check_device_id(device_id).encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def read_phone_secret(path: Path) -> bytes:
    """The provisioning secret: a text file (as ``deploy/init-secrets.sh`` writes it), read
    without the whitespace around it."""
    try:
        secret = path.read_bytes().strip()
    except OSError:
        raise TransportError("cannot read the MQTT phone secret file") from None
    if len(secret) < 16:
        raise TransportError("the MQTT phone secret must be at least 16 bytes")
    return secret


def phone_secret_from_environment() -> bytes | None:
    """The provisioning secret from the file ``JPKI_MQTT_PHONE_SECRET_FILE`` names, if set."""
    path = os.environ.get(PHONE_SECRET_FILE_ENV)
    return read_phone_secret(Path(path)) if path else None


@dataclass(frozen=True, slots=True)
class MqttAddress:
    hostname: str
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def from_url(cls, url: str) -> MqttAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "tcp") or not parts.hostname:
            raise TransportError("MQTT URL must look like mqtt://[user:password@]host[:port]")
        return cls(
            hostname=parts.hostname,
            port=parts.port or 1883,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )


class MqttSession:
    def __init__(
        self,
        url: str,
        *,
        identifier: str,
        subscriptions: Sequence[str] = (),
        on_message: RawHandler | None = None,
        pipelined: bool = False,
        max_inflight: int = 100,
        clean_session: bool = False,
        backoff: RetryBackoff | None = None,
        rng: random.Random | None = None,
        publish_timeout: float = 10.0,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        """``username``/``password``, when given, replace those of the URL."""
        self._address = MqttAddress.from_url(url)
        if username is not None:
            self._address = dataclasses.replace(
                self._address, username=username, password=password
            )
        self.identifier = identifier
        self._subscriptions = tuple(subscriptions)
        self._on_message = on_message
        self._pipelined = pipelined
        self._max_inflight = max_inflight
        self._clean_session = clean_session
        self._backoff = backoff or RetryBackoff(base=0.2, cap=10.0)
        self._rng = rng or random.Random()
        self._publish_timeout = publish_timeout
        self._client: aiomqtt.Client | None = None
        # publishes of the current connection waiting for their PUBACK, by packet id
        self._pubacks: dict[int, tuple[asyncio.Future[None], asyncio.TimerHandle]] = {}
        self._task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Future[None]] = set()
        self._inbox = _Inbox()  # the current connection's (``_new_client``)
        self._closing = False
        self.connected = asyncio.Event()
        self.connections = 0  # how many times a session was (re)established
        # messages received on the current connection and not yet acknowledged: retire()
        # ends the session only once this is zero, so no message is dropped with it
        self._unacked = 0
        self._all_acked = asyncio.Event()
        self._all_acked.set()

    def __repr__(self) -> str:
        return f"MqttSession({self.identifier!r}, {self._address.hostname}:{self._address.port})"

    async def start(self, *, wait: float | None = 10.0) -> None:
        """Start the session loop; by default wait (bounded) for the first connection."""
        self._task = asyncio.create_task(self._run(), name=f"mqtt-session-{self.identifier}")
        if wait is not None:
            try:
                await asyncio.wait_for(self.connected.wait(), wait)
            except TimeoutError:
                await self.close()
                raise TransportError(
                    f"MQTT broker {self._address.hostname}:{self._address.port} not reachable"
                ) from None

    async def close(self, *, forget: bool = False) -> None:
        """Disconnect. The broker keeps the session (subscriptions, queued messages) for
        our return, unless ``forget``: then it is ended for good (a disposed phone)."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        self.connected.clear()
        if forget:
            # MQTT 3.1.1 §3.1.2.4: connecting with CleanSession=1 discards the old session.
            try:
                async with aiomqtt.Client(
                    self._address.hostname,
                    self._address.port,
                    username=self._address.username,
                    password=self._address.password,
                    identifier=self.identifier,
                    clean_session=True,
                    protocol=aiomqtt.ProtocolVersion.V311,
                ):
                    pass
            except aiomqtt.MqttError as exc:
                log.warning("mqtt.forget_failed", client_id=self.identifier, error=str(exc))

    async def retire(self, *, drain_timeout: float = 10.0) -> None:
        """Leave for good without losing a message: unsubscribe (the broker sends us
        nothing new; a shared subscription's share goes to the rest of its group), let
        every message already received be handled and acknowledged, then end the session,
        so that it does not stay behind in the group taking its share (mosquitto #1747).
        If that does not finish in ``drain_timeout`` the session is kept, as by ``close``:
        the broker resends what we had not acknowledged when this identifier returns."""
        client = self._client
        drained = client is None  # not connected: nothing received is waiting for its ack
        if client is not None:
            try:
                async with asyncio.timeout(drain_timeout):
                    for topic in self._subscriptions:
                        await client.unsubscribe(topic)
                    # the UNSUBACK came after every message sent before it (one TCP stream)
                    while len(self._inbox) or self._unacked:
                        if self._unacked:
                            await self._all_acked.wait()
                        else:
                            await asyncio.sleep(0.01)  # queued: the receive loop takes it
                drained = True
            except (aiomqtt.MqttError, TimeoutError) as exc:
                log.warning("mqtt.retire_not_drained", client_id=self.identifier,
                            unacked=self._unacked, error=type(exc).__name__)
        await self.close(forget=drained)

    def _new_client(self) -> aiomqtt.Client:
        client = aiomqtt.Client(
            self._address.hostname,
            self._address.port,
            username=self._address.username,
            password=self._address.password,
            identifier=self.identifier,
            clean_session=self._clean_session,
            protocol=aiomqtt.ProtocolVersion.V311,
            keepalive=30,
            max_inflight_messages=self._max_inflight,
        )
        # aiomqtt has no manual-ack switch; its paho client does. Acking after handling
        # is what makes QoS 1 at-least-once through a crash.
        client._client.manual_ack_set(True)
        # PUBACKs complete this session's own futures (``publish``): aiomqtt's publish
        # costs three tasks and a scan of every pending call per message.
        client._client.on_publish = self._on_puback
        # set before connecting: a persistent session's queued messages follow the CONNACK
        self._inbox = _Inbox()
        client._client.on_message = self._inbox.put
        writer = _SocketWriter(client, asyncio.get_running_loop())
        client._client.on_socket_register_write = writer.register
        client._client.on_socket_unregister_write = writer.unregister
        return client

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                client = self._new_client()
                inbox = self._inbox
                async with client:
                    client._disconnected.add_done_callback(inbox.lose)
                    for topic in self._subscriptions:
                        await client.subscribe(topic, qos=QOS)
                    self._client = client
                    self._unacked = 0  # the broker resends the last connection's unacked
                    self._all_acked.set()
                    attempt = 0
                    self.connections += 1
                    self.connected.set()
                    log.info("mqtt.connected", client_id=self.identifier)
                    await self._receive(client, inbox)
            except aiomqtt.MqttError as exc:
                log.warning("mqtt.connection_lost", client_id=self.identifier, error=str(exc))
            finally:
                self.connected.clear()
                self._client = None
                self._fail_pubacks("connection lost")
            attempt += 1
            await asyncio.sleep(self._backoff.delay(attempt, self._rng))

    async def _receive(self, client: aiomqtt.Client, inbox: _Inbox) -> None:
        if not self._pipelined:
            while True:
                message = await inbox.get()
                self._received()
                await self._handle(message)
                self._ack(client, message)
        in_order: asyncio.Queue[tuple[mqtt.MQTTMessage, asyncio.Future[None]]] = asyncio.Queue(
            self._max_inflight
        )
        acker = asyncio.create_task(self._ack_in_order(client, in_order))
        try:
            while True:
                message = await inbox.get()
                self._received()
                await in_order.put((message, self._start(message)))
        finally:
            acker.cancel()
            await asyncio.gather(acker, return_exceptions=True)

    def _start(self, message: mqtt.MQTTMessage) -> asyncio.Future[None]:
        """Start handling ``message``: a coroutine runs as a task, a future is kept as is."""
        handling: asyncio.Future[None] | None = None
        try:
            if self._on_message is not None:
                handling = asyncio.ensure_future(self._on_message(message))
        except Exception as exc:  # a handler that fails before it returns its future
            self._handler_failed(message, exc)
        if handling is None:
            handling = asyncio.get_running_loop().create_future()
            handling.set_result(None)
            return handling
        self._handlers.add(handling)
        handling.add_done_callback(self._handlers.discard)
        return handling

    async def _ack_in_order(
        self,
        client: aiomqtt.Client,
        in_order: asyncio.Queue[tuple[mqtt.MQTTMessage, asyncio.Future[None]]],
    ) -> None:
        while True:
            message, handling = await in_order.get()
            if not handling.done():
                await asyncio.wait((handling,))
            if handling.cancelled():
                return  # the session is closing: the broker resends what was not acked
            failure = handling.exception()
            if failure is not None:
                self._handler_failed(message, failure)
            self._ack(client, message)

    async def _handle(self, message: mqtt.MQTTMessage) -> None:
        if self._on_message is None:
            return
        try:
            await self._on_message(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._handler_failed(message, exc)

    def _handler_failed(self, message: mqtt.MQTTMessage, exc: BaseException) -> None:
        log.error(
            "mqtt.handler_failed",
            client_id=self.identifier,
            topic=message.topic,
            error=type(exc).__name__,
        )

    def _received(self) -> None:
        self._unacked += 1
        self._all_acked.clear()

    def _ack(self, client: aiomqtt.Client, message: mqtt.MQTTMessage) -> None:
        if message.qos > 0:
            client._client.ack(message.mid, message.qos)
        if client is self._client:
            self._unacked -= 1
            if not self._unacked:
                self._all_acked.set()

    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK, across reconnects."""
        attempt = 0
        while True:
            if self._closing:
                raise TransportError("MQTT session is closed")
            client = self._client
            if client is None:
                await self.connected.wait()
                continue
            try:
                await self._send(client, topic, payload)
                return
            except TransportError as exc:
                error = str(exc)
            attempt += 1
            log.warning("mqtt.publish_retry", client_id=self.identifier, error=error)
            await asyncio.sleep(self._backoff.delay(attempt, self._rng))

    def _send(self, client: aiomqtt.Client, topic: str, payload: bytes) -> asyncio.Future[None]:
        """Hand one QoS 1 publish to paho; the future ends with its PUBACK, or fails when
        the connection goes (``_fail_pubacks``) or no PUBACK came in time."""
        loop = asyncio.get_running_loop()
        puback: asyncio.Future[None] = loop.create_future()
        info = client._client.publish(topic, payload, QOS)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            puback.set_exception(TransportError(f"publish refused: {mqtt.error_string(info.rc)}"))
        else:
            overdue = loop.call_later(self._publish_timeout, self._puback_overdue, info.mid)
            self._pubacks[info.mid] = (puback, overdue)
        return puback

    def _on_puback(self, _client: Any, _userdata: Any, mid: int, *_reason: Any) -> None:
        waiting = self._pubacks.pop(mid, None)
        if waiting is not None:
            puback, overdue = waiting
            overdue.cancel()
            if not puback.done():
                puback.set_result(None)

    def _puback_overdue(self, mid: int) -> None:
        waiting = self._pubacks.pop(mid, None)
        if waiting is not None and not waiting[0].done():
            waiting[0].set_exception(TransportError("no PUBACK in time"))

    def _fail_pubacks(self, why: str) -> None:
        waiting, self._pubacks = self._pubacks, {}
        for puback, overdue in waiting.values():
            overdue.cancel()
            if not puback.done():
                puback.set_exception(TransportError(why))


class MqttPhoneLink(PhoneLink):
    """A phone's own MQTT session: its down topic in, its up topic out.

    With a provisioning secret (given, or from ``JPKI_MQTT_PHONE_SECRET_FILE``) the phone
    logs in as its device id with its derived password, as a broker with per-device ACLs
    requires; without one it uses the URL's credentials, if any.
    """

    def __init__(
        self,
        url: str,
        device_id: str,
        *,
        topic_root: str = TOPIC_ROOT,
        backoff: RetryBackoff | None = None,
        rng: random.Random | None = None,
        phone_secret: bytes | None = None,
    ) -> None:
        self.device_id = check_device_id(device_id)
        secret = phone_secret if phone_secret is not None else phone_secret_from_environment()
        self._password = None if secret is None else phone_password(secret, self.device_id)
        self._root = topic_root
        self._url = url
        self._backoff = backoff
        self._rng = rng
        self._session: MqttSession | None = None

    async def start(self, on_message: DownHandler) -> None:
        async def on_raw(message: mqtt.MQTTMessage) -> None:
            await deliver_down(self.device_id, message.payload, on_message)

        self._session = MqttSession(
            self._url,
            identifier=f"jpki-phone-{self.device_id}",
            subscriptions=[down_topic(self.device_id, self._root)],
            on_message=on_raw,
            backoff=self._backoff,
            rng=self._rng,
            username=None if self._password is None else self.device_id,
            password=self._password,
        )
        await self._session.start()

    async def send(self, message: Message) -> None:
        if self._session is None:
            raise TransportError("phone link is not started")
        check_from_phone(message, self.device_id)
        await self._session.publish(up_topic(self.device_id, self._root), encode(message))

    async def close(self, *, forget: bool = False) -> None:
        if self._session is not None:
            await self._session.close(forget=forget)
