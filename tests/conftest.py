"""Service fixtures: real RabbitMQ, MQTT and PostgreSQL, or a loud skip.

With ``JPKI_REQUIRE_SERVICES=1`` (CI sets it) an absent service fails the test instead.
"""

from __future__ import annotations

import os
import socket
import uuid
from urllib.parse import urlsplit

import pytest
import structlog
from hypothesis import HealthCheck, settings

from tests.services import unavailable

AMQP_URL = os.environ.get("JPKI_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
MQTT_URL = os.environ.get("JPKI_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")
# Property tests judge behaviour, not speed: on a loaded 2-core machine input generation and
# single examples can be slow, which must not fail a test.
settings.register_profile(
    "jpki", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)
settings.load_profile(os.environ.get("JPKI_HYPOTHESIS_PROFILE", "jpki"))

PG_URL = os.environ.get("JPKI_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        address = (parts.hostname or "127.0.0.1", parts.port or default_port)
        with socket.create_connection(address, 2):
            return True
    except OSError:
        return False


def _need(name: str, url: str, default_port: int) -> str:
    if _reachable(url, default_port):
        return url
    reason = f"*** {name} is not reachable at {url}: test SKIPPED (start the service) ***"
    unavailable(reason)


@pytest.fixture
def amqp_url() -> str:
    return _need("RabbitMQ", AMQP_URL, 5672)


@pytest.fixture
def mqtt_url() -> str:
    return _need("MQTT broker", MQTT_URL, 1883)


@pytest.fixture
def pg_url() -> str:
    return _need("PostgreSQL", PG_URL, 5432)


@pytest.fixture
def unique() -> str:
    """A short unique suffix for queue, topic and schema names shared with other test runs."""
    return uuid.uuid4().hex[:10]


@pytest.fixture(autouse=True)
def _fresh_structlog():
    """Each test starts from structlog's defaults: a test that configures logging (a level, a
    stream) must not change what the next test's ``capture_logs`` sees."""
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
