"""deploy/rabbitmq/rabbitmq.conf boots a real RabbitMQ node that imports the definitions.

A second node (own name, ports and data directory) starts with the committed config and
plugins, the committed topology and a users file made as the deployment makes it: the
config must pass the broker's own validation, the import must create the queues, the
deployment's user must log in, guest must not exist, and the services' declarations
must agree with what was imported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest

from infra.bus import declare_topology, deployment_topology
from infra.transport.base import TopologyMismatch
from infra.transport.definitions import broker_users
from infra.transport.rabbitmq import RabbitMQTransport
from tests.services import unavailable

pytestmark = pytest.mark.rabbitmq

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq"
SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _local_config(committed: str, root: Path, amqp: int, management: int, prom: int) -> str:
    """The committed config with this machine's ports and paths (and nothing else)."""
    replaced = {
        r"^load_definitions = .*$": f"load_definitions = {root / 'definitions.d'}",
        r"^listeners\.tcp\.default = .*$": f"listeners.tcp.default = {amqp}",
        r"^management\.tcp\.port = .*$": f"management.tcp.port = {management}",
        r"^prometheus\.tcp\.port = .*$": f"prometheus.tcp.port = {prom}",
        # a test machine's disk is smaller than a broker's
        r"^disk_free_limit\.absolute = .*$": "disk_free_limit.absolute = 50MB",
    }
    text = committed
    for pattern, line in replaced.items():
        text, count = re.subn(pattern, line, text, flags=re.MULTILINE)
        assert count == 1, f"deploy config lost its {pattern!r} line"
    return text


@dataclass
class Node:
    port: int
    password: str

    def url(self, user: str = "jpki", password: str | None = None) -> str:
        return f"amqp://{user}:{password or self.password}@127.0.0.1:{self.port}/"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    if not SERVER.exists():
        reason = f"*** {SERVER} is not installed: test SKIPPED (install rabbitmq-server) ***"
        unavailable(reason)
    amqp, dist, management, prom = _free_ports(4)
    definitions = tmp_path / "definitions.d"
    definitions.mkdir()
    shutil.copy(DEPLOY / "definitions.json", definitions / "10-topology.json")
    password = uuid.uuid4().hex
    users = broker_users([("jpki", password)], tags=("administrator",))
    (definitions / "20-users.json").write_text(json.dumps(users))
    config = tmp_path / "rabbitmq.conf"
    config.write_text(_local_config(
        (DEPLOY / "rabbitmq.conf").read_text(), tmp_path, amqp, management, prom
    ))
    shutil.copy(DEPLOY / "enabled_plugins", tmp_path / "enabled_plugins")
    env = {
        **os.environ,
        "RABBITMQ_NODENAME": f"jpki-deploy-{uuid.uuid4().hex[:8]}@localhost",
        "RABBITMQ_NODE_PORT": str(amqp),
        "RABBITMQ_DIST_PORT": str(dist),
        "RABBITMQ_CONFIG_FILE": str(config),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(tmp_path / "enabled_plugins"),
        "RABBITMQ_MNESIA_BASE": str(tmp_path / "mnesia"),
        "RABBITMQ_LOG_BASE": str(tmp_path / "log"),
    }
    out = (tmp_path / "node.out").open("wb")
    process = subprocess.Popen(  # noqa: S603 - the system's broker, our config
        [str(SERVER)], env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                pytest.fail(f"RabbitMQ refused the deploy config:\n"
                            f"{(tmp_path / 'node.out').read_text()[-3000:]}")
            if b"Starting broker... completed" in (tmp_path / "node.out").read_bytes():
                break
            assert time.monotonic() < deadline, "RabbitMQ did not boot in 90 s"
            time.sleep(0.2)
        yield Node(amqp, password)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        out.close()


async def test_the_deploy_config_boots_and_imports_topology_and_users(node: Node) -> None:
    with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(node.url("guest", "guest"))  # no default user was made
    connection = await aio_pika.connect(node.url())
    try:
        channel = await connection.channel()
        for spec in deployment_topology():  # passive: present before anyone declared it
            await channel.declare_queue(spec.name, passive=True)
            await channel.declare_queue(spec.name + ".parking", passive=True)
    finally:
        await connection.close()
    transport = RabbitMQTransport(node.url(), connection_name="deploy-boot")
    await transport.connect()
    try:
        await declare_topology(transport)
        for spec in deployment_topology():
            await transport.declare_queue(
                spec.name, spec.bindings, single_active_consumer=spec.single_active_consumer
            )
        with pytest.raises(TopologyMismatch):
            await transport.declare_queue("ca", ["ca.cmd.#"], single_active_consumer=True)
    finally:
        await transport.close()
