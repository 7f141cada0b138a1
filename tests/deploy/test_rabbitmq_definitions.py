"""deploy/rabbitmq/definitions.json is what the code declares, and RabbitMQ agrees.

The import test loads the committed file into a fresh vhost through the management API
(plugin ``rabbitmq_management``), then lets the services' own declarations run against it:
an argument that drifted would raise ``TopologyMismatch`` there.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import aiohttp
import pytest

from infra.bus import declare_topology, deployment_topology
from infra.transport.base import TopologyMismatch, parking_lot
from infra.transport.definitions import (
    broker_users,
    definitions_json,
    rabbit_password_hash,
    topology_definitions,
)
from infra.transport.rabbitmq import RabbitMQTransport
from tests.services import unavailable

DEFINITIONS = Path(__file__).resolve().parents[2] / "deploy" / "rabbitmq" / "definitions.json"
MANAGEMENT_URL = os.environ.get("JPKI_TEST_RABBITMQ_MANAGEMENT_URL", "http://127.0.0.1:15672")


def test_committed_definitions_are_what_the_code_generates() -> None:
    committed = DEFINITIONS.read_text()
    assert committed == definitions_json(topology_definitions()), (
        "deploy/rabbitmq/definitions.json is stale: regenerate it with "
        "`jpki ops topology --definitions > deploy/rabbitmq/definitions.json`"
    )


def test_definitions_hold_every_queue_its_parking_lot_and_bindings() -> None:
    definitions = json.loads(DEFINITIONS.read_text())
    queues = {q["name"]: q["arguments"] for q in definitions["queues"]}
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in definitions["bindings"]}
    for spec in deployment_topology():
        assert queues[spec.name]["x-queue-type"] == "quorum"
        assert queues[spec.name]["x-delivery-limit"] == 5
        assert queues[spec.name]["x-dead-letter-exchange"] == "jpki.dlx"
        assert queues[parking_lot(spec.name)] == {"x-queue-type": "quorum"}
        assert ("jpki.dlx", parking_lot(spec.name), spec.name) in bindings
        assert {("jpki", spec.name, key) for key in spec.bindings} <= bindings
    assert queues["gateway.down"]["x-single-active-consumer"] is True


def test_rabbit_password_hash_is_salted_sha256() -> None:
    # the worked example of RabbitMQ's password hashing documentation ("test12")
    expected = "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"
    assert rabbit_password_hash("test12", bytes.fromhex("908dc60a")) == expected
    assert rabbit_password_hash("test12") != rabbit_password_hash("test12")


@pytest.fixture
def management_url(amqp_url: str) -> str:
    parts = urlsplit(MANAGEMENT_URL)
    try:
        with socket.create_connection((parts.hostname, parts.port or 15672), 2):
            return MANAGEMENT_URL
    except OSError:
        reason = (f"*** RabbitMQ management API not reachable at {MANAGEMENT_URL}: test SKIPPED "
                  "(rabbitmq-plugins enable rabbitmq_management) ***")
        unavailable(reason)


def _login(amqp_url: str) -> str:
    return urlsplit(amqp_url).username or "guest"


def _management(amqp_url: str) -> aiohttp.ClientSession:
    parts = urlsplit(amqp_url)
    basic = aiohttp.encode_basic_auth(parts.username or "guest", parts.password or "guest")
    return aiohttp.ClientSession(headers={"Authorization": basic})


def _with_vhost(amqp_url: str, vhost: str, user: str | None = None, password: str = "") -> str:
    parts = urlsplit(amqp_url)
    netloc = parts.netloc if user is None else f"{user}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, "/" + quote(vhost, safe=""), "", ""))


@pytest.mark.rabbitmq
async def test_imported_definitions_match_the_services_declarations(
    amqp_url: str, management_url: str, unique: str
) -> None:
    vhost = f"jpki-deploy-{unique}"
    api = f"{management_url}/api"
    v = quote(vhost, safe="")
    async with _management(amqp_url) as http:
        (await http.put(f"{api}/vhosts/{v}")).raise_for_status()
        try:
            user = _login(amqp_url)
            everything = {"configure": ".*", "write": ".*", "read": ".*"}
            (await http.put(f"{api}/permissions/{v}/{user}", json=everything)).raise_for_status()
            imported = await http.post(
                f"{api}/definitions/{v}",
                data=DEFINITIONS.read_bytes(),
                headers={"content-type": "application/json"},
            )
            imported.raise_for_status()
            async with http.get(f"{api}/queues/{v}") as response:
                on_broker = {q["name"]: q["arguments"] for q in await response.json()}
            expected = {q["name"]: q["arguments"] for q in topology_definitions()["queues"]}
            assert on_broker == expected  # the import itself created every queue

            transport = RabbitMQTransport(_with_vhost(amqp_url, vhost), connection_name="deploy")
            await transport.connect()
            try:
                await declare_topology(transport)  # what the services run at start
                for spec in deployment_topology():
                    await transport.declare_queue(
                        spec.name, spec.bindings,
                        single_active_consumer=spec.single_active_consumer,
                    )
                # and the check has teeth: another delivery limit is refused
                with pytest.raises(TopologyMismatch):
                    await transport.declare_queue("tsm", ["tsm.cmd.#"], delivery_limit=7)
            finally:
                await transport.close()
            async with http.get(f"{api}/bindings/{v}") as response:
                on_broker_bindings = {
                    (b["source"], b["destination"], b["routing_key"])
                    for b in await response.json() if b["source"]
                }
            declared = {
                (b["source"], b["destination"], b["routing_key"])
                for b in topology_definitions()["bindings"]
            }
            assert on_broker_bindings == declared  # the declarations added no binding
        finally:
            await http.delete(f"{api}/vhosts/{v}")


@pytest.mark.rabbitmq
async def test_generated_broker_users_log_in_with_their_password(
    amqp_url: str, management_url: str, unique: str, tmp_path: Path
) -> None:
    vhost, name, password = f"jpki-users-{unique}", f"jpki-svc-{unique}", f"pw-{unique}-x"
    api = f"{management_url}/api"
    v = quote(vhost, safe="")
    async with _management(amqp_url) as http:
        (await http.put(f"{api}/vhosts/{v}")).raise_for_status()
        try:
            users = broker_users([(name, password)], vhost=vhost)
            (await http.post(f"{api}/definitions", json=users)).raise_for_status()
            connection = await aio_pika.connect(_with_vhost(amqp_url, vhost, name, password))
            await connection.close()
            with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
                await aio_pika.connect(_with_vhost(amqp_url, vhost, name, password + "!"))
        finally:
            await http.delete(f"{api}/users/{name}")
            await http.delete(f"{api}/vhosts/{v}")
