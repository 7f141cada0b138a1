"""End-to-end fixtures: an isolated RabbitMQ virtual host per test (created through the
management API), so queue names of the routing convention never meet another run's."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import pytest

from infra.logging import configure_logging
from tests.services import unavailable

MANAGEMENT_URL = os.environ.get("JPKI_TEST_RABBITMQ_MANAGEMENT_URL", "http://127.0.0.1:15672")


@pytest.fixture(autouse=True)
def quiet_logs() -> None:
    """Warnings and errors only: a whole fleet's info lines would cost more than the run."""
    configure_logging("e2e", level="WARNING", pretty=False, stream=sys.stderr)


@pytest.fixture
async def amqp_vhost_url(amqp_url: str, unique: str) -> AsyncIterator[str]:
    parts = urlsplit(amqp_url)
    user, password = parts.username or "guest", parts.password or "guest"
    vhost = f"jpki-e2e-{unique}"
    headers = {"Authorization": aiohttp.encode_basic_auth(user, password)}
    api = f"{MANAGEMENT_URL}/api"
    async with aiohttp.ClientSession(headers=headers) as http:
        try:
            async with http.put(f"{api}/vhosts/{quote(vhost, safe='')}") as answer:
                answer.raise_for_status()
        except aiohttp.ClientError as exc:
            unavailable(f"*** RabbitMQ management API unusable at {MANAGEMENT_URL}: {exc}:"
                        " test SKIPPED ***")
        permissions = {"configure": ".*", "write": ".*", "read": ".*"}
        async with http.put(f"{api}/permissions/{quote(vhost, safe='')}/{quote(user)}",
                            json=permissions) as answer:
            answer.raise_for_status()
        netloc = parts.netloc
        yield urlunsplit((parts.scheme, netloc, "/" + quote(vhost, safe=""), "", ""))
        async with http.delete(f"{api}/vhosts/{quote(vhost, safe='')}") as answer:
            answer.raise_for_status()
