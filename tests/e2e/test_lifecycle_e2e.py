"""Every life-cycle flow end to end on RabbitMQ + Mosquitto + PostgreSQL: the orchestrator,
the SP-TSM and CA workers, the gateway and the phones' MQTT sessions, each story checking
the phone (applet, keys, PIN states), the TSM registry and the CA's OCSP answers
(``tests/e2e/lifecycle_stories.py``; the same stories run in-process under
``tests/orchestrator/flows``).

The stories share one stack (a RabbitMQ vhost, a topic root and PostgreSQL schemas of
their own, started once for this module): each story has its own people and phones, so
they cannot see one another. The not-found story needs a short not-found period and runs
on a stack of its own (``test_lifecycle_timer_e2e.py``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import pytest
import pytest_asyncio

from tests.e2e.conftest import MANAGEMENT_URL
from tests.e2e.lifecycle_stories import STORIES
from tests.e2e.lifecycle_world import World, drop_schemas, lifecycle_world, real_services
from tests.services import unavailable

pytestmark = [pytest.mark.e2e, pytest.mark.rabbitmq, pytest.mark.mqtt, pytest.mark.postgres,
              pytest.mark.asyncio(loop_scope="module")]

SHARED = [name for name in STORIES if name != "temporary_loss_not_found"]


def _url(env: str, default: str) -> str:
    return os.environ.get(env, default)




@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    amqp_url = _url("JPKI_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    mqtt_url = _url("JPKI_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")
    pg_url = _url("JPKI_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
    unique = uuid.uuid4().hex[:10]
    parts = urlsplit(amqp_url)
    vhost = f"jpki-e2e-{unique}"
    user, password = parts.username or "guest", parts.password or "guest"
    headers = {"Authorization": aiohttp.encode_basic_auth(user, password)}
    api = f"{MANAGEMENT_URL}/api"
    async with aiohttp.ClientSession(headers=headers) as http:
        try:
            async with http.put(f"{api}/vhosts/{quote(vhost, safe='')}") as answer:
                answer.raise_for_status()
            permissions = {"configure": ".*", "write": ".*", "read": ".*"}
            async with http.put(f"{api}/permissions/{quote(vhost, safe='')}/{quote(user)}",
                                json=permissions) as answer:
                answer.raise_for_status()
        except aiohttp.ClientError as exc:
            unavailable(f"*** RabbitMQ management API unusable at {MANAGEMENT_URL}: {exc}:"
                        " test SKIPPED (start the service) ***")
        vhost_url = urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), "", ""))
        services = real_services(vhost_url, mqtt_url, pg_url, unique)
        data_dir = tmp_path_factory.mktemp("lifecycle-e2e")
        try:
            async with lifecycle_world(data_dir, services) as world:
                yield world
        finally:
            try:
                await drop_schemas(services, data_dir)
            finally:
                async with http.delete(f"{api}/vhosts/{quote(vhost, safe='')}") as answer:
                    answer.raise_for_status()


@pytest.mark.parametrize("story", SHARED)
async def test_lifecycle_flow_on_real_services(story: str, shared_world: World) -> None:
    await STORIES[story](shared_world)


