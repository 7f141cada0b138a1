"""RabbitMQ definitions (the broker's import format) generated from the code's topology.

A deployment loads them when the broker boots, so every queue exists with its arguments
before the first service starts; each service still declares what it uses, and a
definition that drifted from the code shows as ``TopologyMismatch`` at that moment.
Users are not part of the topology: ``broker_users`` builds their definitions at deploy
time (RabbitMQ creates no default user when it imports definitions on boot).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from infra.bus import QueueSpec, deployment_topology
from infra.transport.base import DEFAULT_DELIVERY_LIMIT, parking_lot
from infra.transport.rabbitmq import PARKING_LOT_ARGUMENTS, queue_arguments


def topology_definitions(
    specs: Sequence[QueueSpec] | None = None,
    *,
    exchange: str = "jpki",
    dead_letter_exchange: str = "jpki.dlx",
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
    vhost: str = "/",
) -> dict[str, Any]:
    """Exchanges, quorum queues, parking lots and bindings, as ``RabbitMQTransport``
    declares them for ``specs`` (default: the whole deployment)."""
    specs = deployment_topology() if specs is None else specs
    exchanges = [
        _exchange(exchange, "topic", vhost),
        _exchange(dead_letter_exchange, "direct", vhost),
    ]
    queues: list[dict[str, Any]] = []
    bindings: list[dict[str, Any]] = []
    for spec in specs:
        arguments = queue_arguments(
            spec.name,
            delivery_limit=delivery_limit,
            dead_letter_exchange=dead_letter_exchange,
            single_active_consumer=spec.single_active_consumer,
        )
        queues.append(_queue(spec.name, arguments, vhost))
        queues.append(_queue(parking_lot(spec.name), dict(PARKING_LOT_ARGUMENTS), vhost))
        bindings.extend(_binding(exchange, spec.name, key, vhost) for key in spec.bindings)
        bindings.append(_binding(dead_letter_exchange, parking_lot(spec.name), spec.name, vhost))
    return {
        "vhosts": [{"name": vhost}],
        "exchanges": exchanges,
        "queues": queues,
        "bindings": bindings,
    }


def definitions_json(definitions: dict[str, Any]) -> str:
    """The committed form: stable key order, one item a line group, final newline."""
    return json.dumps(definitions, indent=2, sort_keys=True) + "\n"


def rabbit_password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def broker_users(
    users: Sequence[tuple[str, str]],
    *,
    vhost: str = "/",
    tags: Sequence[str] = (),
    hash_password: Callable[[str], str] = rabbit_password_hash,
) -> dict[str, Any]:
    """User definitions with full rights on ``vhost`` (passwords only as salted hashes)."""
    return {
        "users": [
            {
                "name": name,
                "password_hash": hash_password(password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": list(tags),
            }
            for name, password in users
        ],
        "permissions": [
            {"user": name, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}
            for name, _password in users
        ],
    }


def _exchange(name: str, kind: str, vhost: str) -> dict[str, Any]:
    return {
        "name": name,
        "vhost": vhost,
        "type": kind,
        "durable": True,
        "auto_delete": False,
        "internal": False,
        "arguments": {},
    }


def _queue(name: str, arguments: dict[str, Any], vhost: str) -> dict[str, Any]:
    return {"name": name, "vhost": vhost, "durable": True, "auto_delete": False,
            "arguments": arguments}


def _binding(source: str, queue: str, routing_key: str, vhost: str) -> dict[str, Any]:
    return {
        "source": source,
        "vhost": vhost,
        "destination": queue,
        "destination_type": "queue",
        "routing_key": routing_key,
        "arguments": {},
    }
