"""deploy/mosquitto: a second Mosquitto started with the committed config and ACL.

Real clients show the ACL: a phone (username = device id) reads only its own down topic
and writes only its own up topic; the gateway user gets every up message through the
shared subscription and reaches any phone's down topic, with the real ``Gateway``.
"""

from __future__ import annotations

import asyncio
import getpass
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import msgspec
import pytest
from click.testing import CliRunner

from infra.bus import Bus, RetryBackoff
from infra.mqtt import MqttPhoneLink, down_topic, phone_password, up_topic
from infra.transport.base import Delivery
from infra.transport.cli import ops
from infra.transport.inprocess import InProcessTransport
from protocol.envelope import Message, build, decode, message_type
from tests.services import unavailable
from workers.gateway.service import Gateway

pytestmark = pytest.mark.mqtt

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
FAST = RetryBackoff(base=0.05, cap=0.5)
GATEWAY_USER = "jpki-gateway"


@message_type("app.cmd.deploytest_show", 1)
class Show(msgspec.Struct, frozen=True):
    n: int


@message_type("app.event.deploytest_tapped", 1)
class Tapped(msgspec.Struct, frozen=True):
    n: int


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found:
        return found
    reason = f"*** {name} is not installed: test SKIPPED (apt-get install mosquitto) ***"
    unavailable(reason)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _local_config(committed: str, port: int, root: Path) -> str:
    """The committed config with this machine's port and paths (and nothing else)."""
    replaced = {
        r"^listener 1883$": f"listener {port} 127.0.0.1",
        r"^password_file .*$": f"password_file {root / 'passwd'}",
        r"^acl_file .*$": f"acl_file {root / 'acl'}",
        r"^persistence_location .*$": f"persistence_location {root / 'data'}/",
    }
    text = committed
    for pattern, line in replaced.items():
        text, count = re.subn(pattern, line, text, flags=re.MULTILINE)
        assert count == 1, f"deploy config lost its {pattern!r} line"
    # started as root, Mosquitto would drop to its own user, who cannot read our temp dir
    return text + f"\nuser {getpass.getuser()}\n"


@dataclass
class Broker:
    port: int
    phone_secret: bytes
    gateway_password: str
    devices: tuple[str, str]

    def url(self, user: str | None = None, password: str | None = None) -> str:
        login = f"{user}:{password}@" if user else ""
        return f"mqtt://{login}127.0.0.1:{self.port}"

    def phone_client(self, device: str, password: str | None = None) -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1", self.port, identifier=f"test-{device}", username=device,
            password=password or phone_password(self.phone_secret, device),
        )


@pytest.fixture
def broker(tmp_path: Path, unique: str) -> Iterator[Broker]:
    mosquitto, mosquitto_passwd = _tool("mosquitto"), _tool("mosquitto_passwd")
    (tmp_path / "data").mkdir()
    # a text secret, as deploy/init-secrets.sh makes: the file is read with its whitespace
    # stripped, so random bytes with a space or newline at an end would not match it
    phone_secret = secrets.token_urlsafe(32).encode()
    gateway_password = secrets.token_urlsafe(16)
    (tmp_path / "phone.secret").write_bytes(phone_secret)
    (tmp_path / "gateway.password").write_text(gateway_password + "\n")
    prefix = f"t{unique}"
    made = CliRunner().invoke(ops, [
        "mqtt-passwords", "--phones", "2", "--device-prefix", prefix,
        "--phone-secret-file", str(tmp_path / "phone.secret"),
        "--gateway-password-file", str(tmp_path / "gateway.password"),
        "--out", str(tmp_path / "passwd"),
    ])
    assert made.exit_code == 0, made.output
    subprocess.run([mosquitto_passwd, "-U", str(tmp_path / "passwd")], check=True)  # noqa: S603
    shutil.copy(DEPLOY / "acl", tmp_path / "acl")
    port = _free_port()
    config = tmp_path / "mosquitto.conf"
    config.write_text(_local_config((DEPLOY / "mosquitto.conf").read_text(), port, tmp_path))
    log = (tmp_path / "mosquitto.log").open("wb")
    process = subprocess.Popen(  # noqa: S603 - the system's broker, our config
        [mosquitto, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        for _ in range(100):
            if process.poll() is not None:
                pytest.fail(f"mosquitto refused the deploy config:\n"
                            f"{(tmp_path / 'mosquitto.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield Broker(port, phone_secret, gateway_password, (f"{prefix}-00000", f"{prefix}-00001"))
    finally:
        process.terminate()
        process.wait(10)
        log.close()


async def _next(client: aiomqtt.Client, wait: float) -> aiomqtt.Message | None:
    try:
        async with asyncio.timeout(wait):
            async for message in client.messages:
                return message
    except TimeoutError:
        return None
    return None


async def test_anonymous_and_wrong_passwords_are_refused(broker: Broker) -> None:
    alice, _bob = broker.devices
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="anon"):
            pass
    with pytest.raises(aiomqtt.MqttError):
        async with broker.phone_client(alice, password="not-" + "the-password"):
            pass
    async with broker.phone_client(alice):  # its derived password is accepted
        pass


async def test_a_phone_cannot_read_another_phones_down_topic(broker: Broker) -> None:
    alice, bob = broker.devices
    async with (
        broker.phone_client(alice) as thief,
        broker.phone_client(bob) as owner,
        aiomqtt.Client("127.0.0.1", broker.port, identifier="gw-test",
                       username=GATEWAY_USER, password=broker.gateway_password) as gateway,
    ):
        await thief.subscribe(down_topic(bob), qos=1)
        await thief.subscribe("jpki/dev/+/down", qos=1)
        await owner.subscribe(down_topic(bob), qos=1)
        await gateway.publish(down_topic(bob), b"for bob only", qos=1)
        received = await _next(owner, 5)
        assert received is not None and received.payload == b"for bob only"
        assert await _next(thief, 1) is None


async def test_a_phone_cannot_publish_on_another_phones_up_topic(broker: Broker) -> None:
    alice, bob = broker.devices
    async with (
        broker.phone_client(alice) as forger,
        aiomqtt.Client("127.0.0.1", broker.port, identifier="gw-test",
                       username=GATEWAY_USER, password=broker.gateway_password) as gateway,
    ):
        await gateway.subscribe("$share/jpki-gateway/jpki/dev/+/up", qos=1)
        await forger.publish(up_topic(bob), b"forged as bob", qos=1)  # dropped by the broker
        await forger.publish("jpki/dev/other/down", b"pretending to be the back end", qos=1)
        await forger.publish(up_topic(alice), b"alice's own", qos=1)
        received = await _next(gateway, 5)
        # one client's messages arrive in order: had the forgery passed, it came first
        assert received is not None
        assert (received.topic.value, received.payload) == (up_topic(alice), b"alice's own")
        assert await _next(gateway, 1) is None


@pytest.fixture
async def gateway_on(broker: Broker, unique: str) -> AsyncIterator[tuple[Bus, Gateway]]:
    transport = InProcessTransport()
    await transport.connect()
    gateway = Gateway(
        transport,
        broker.url(GATEWAY_USER, broker.gateway_password),
        name=f"deploy-{unique}",
        backoff=FAST,
    )
    await gateway.start()
    try:
        yield Bus(transport), gateway
    finally:
        await gateway.stop(forget=True)
        await transport.close()


async def test_the_gateway_path_works_through_the_acl(
    broker: Broker, gateway_on: tuple[Bus, Gateway]
) -> None:
    bus, gateway = gateway_on
    alice, _bob = broker.devices
    up: asyncio.Queue[Message] = asyncio.Queue()

    async def backend(delivery: Delivery) -> None:
        await up.put(decode(delivery.body))
        await delivery.ack()

    await bus.transport.declare_queue("backend", ["app.event.#"])
    await bus.transport.consume("backend", backend)
    down: asyncio.Queue[Message] = asyncio.Queue()

    async def on_down(message: Message) -> None:
        await down.put(message)

    # the phone logs in as its device id with the password derived from the secret
    phone = MqttPhoneLink(broker.url(), alice, backoff=FAST, phone_secret=broker.phone_secret)
    await phone.start(on_down)
    try:
        await bus.publish(build(Show(1), saga_id="s-deploy", device_id=alice))
        shown = await asyncio.wait_for(down.get(), 10)
        assert shown.body == Show(1)
        await phone.send(build(Tapped(2), saga_id="s-deploy", device_id=alice))
        tapped = await asyncio.wait_for(up.get(), 10)
        assert tapped.body == Tapped(2) and tapped.envelope.device_id == alice
        assert gateway.stats.up == 1 and gateway.stats.down == 1
    finally:
        await phone.close(forget=True)


def test_mqtt_passwords_refuses_a_short_secret(tmp_path: Path) -> None:
    (tmp_path / "phone.secret").write_text("short")
    (tmp_path / "gateway.password").write_text("gw-password")
    made = CliRunner().invoke(ops, [
        "mqtt-passwords", "--phones", "1",
        "--phone-secret-file", str(tmp_path / "phone.secret"),
        "--gateway-password-file", str(tmp_path / "gateway.password"),
        "--out", str(tmp_path / "passwd"),
    ])
    assert made.exit_code != 0 and "at least 16 bytes" in made.output
    assert not (tmp_path / "passwd").exists()

