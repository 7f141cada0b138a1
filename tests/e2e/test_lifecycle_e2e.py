"""Every life-cycle flow end to end on RabbitMQ + Mosquitto + PostgreSQL: the orchestrator,
the SP-TSM and CA workers, the gateway and the phones' MQTT sessions, each story checking
the phone (applet, keys, PIN states), the TSM registry and the CA's OCSP answers
(``tests/e2e/lifecycle_stories.py``; the same stories run in-process under
``tests/orchestrator/flows``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.lifecycle_stories import STORIES
from tests.e2e.lifecycle_world import drop_schemas, lifecycle_world, real_services

pytestmark = [pytest.mark.e2e, pytest.mark.rabbitmq, pytest.mark.mqtt, pytest.mark.postgres]


@pytest.mark.parametrize("story", list(STORIES))
async def test_lifecycle_flow_on_real_services(
    story: str, tmp_path: Path, amqp_vhost_url: str, mqtt_url: str, pg_url: str, unique: str
) -> None:
    services = real_services(amqp_vhost_url, mqtt_url, pg_url, unique)
    try:
        # only the not-found story waits for the timer; the others keep the phone held
        period = 3.0 if story == "temporary_loss_not_found" else 3600.0
        async with lifecycle_world(tmp_path, services, not_found_period_s=period) as world:
            await STORIES[story](world)
    finally:
        await drop_schemas(services, tmp_path)
