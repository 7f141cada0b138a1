"""Temporary loss not ended by a "found" within the set period: the durable timer (a row in
PostgreSQL's ``saga_timers``) revokes both certificates; RabbitMQ + Mosquitto + PostgreSQL,
on a stack of its own (its period is seconds, not a month)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.lifecycle_stories import story_temporary_loss_not_found
from tests.e2e.lifecycle_world import drop_schemas, lifecycle_world, real_services

pytestmark = [pytest.mark.e2e, pytest.mark.rabbitmq, pytest.mark.mqtt, pytest.mark.postgres]


async def test_not_found_in_time_is_revoked_on_real_services(
    tmp_path: Path, amqp_vhost_url: str, mqtt_url: str, pg_url: str, unique: str
) -> None:
    services = real_services(amqp_vhost_url, mqtt_url, pg_url, unique)
    try:
        async with lifecycle_world(tmp_path, services, not_found_period_s=3.0) as world:
            await story_temporary_loss_not_found(world)
    finally:
        await drop_schemas(services, tmp_path)
