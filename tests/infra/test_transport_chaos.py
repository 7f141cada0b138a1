"""Chaos: RabbitMQ restarted in the middle of a run of confirmed publishes and consumes.

Nothing confirmed may be lost: every message id is consumed at least once, and with
effects de-duplicated by id each effect happens exactly once. Run last in CI (it
restarts the broker). ``JPKI_CHAOS_AMQP_URL`` / ``JPKI_CHAOS_RABBITMQ_NODE`` point it at
another node (``rabbitmqctl -n``) so a shared broker's other users are not disturbed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections import Counter

import pytest

from infra.transport.base import Delivery, Outgoing, TransportError
from infra.transport.rabbitmq import RabbitMQTransport
from tests.services import unavailable

pytestmark = [pytest.mark.chaos, pytest.mark.rabbitmq, pytest.mark.slow]

BEFORE = 1000  # messages published before the restart starts
AFTER = 1000  # and after the broker is back
BATCH = 50


def _rabbitmqctl_or_skip() -> list[str]:
    command = shutil.which("rabbitmqctl")
    if command is None:
        reason = "*** rabbitmqctl not found: chaos test SKIPPED ***"
        unavailable(reason)
    node = os.environ.get("JPKI_CHAOS_RABBITMQ_NODE")
    return [command, *(["-n", node] if node else [])]


def restart_broker(rabbitmqctl: list[str]) -> float:
    """stop_app + start_app; returns how long the broker was away (seconds)."""
    started = time.monotonic()
    for step in (["stop_app"], ["start_app"], ["await_startup"]):
        subprocess.run([*rabbitmqctl, *step], check=True, capture_output=True, timeout=180)
    return time.monotonic() - started


async def test_broker_restart_mid_run_loses_nothing(amqp_url: str, unique: str) -> None:
    rabbitmqctl = _rabbitmqctl_or_skip()
    url = os.environ.get("JPKI_CHAOS_AMQP_URL", amqp_url)
    transport = RabbitMQTransport(
        url, exchange=f"jpki.chaos.{unique}", dead_letter_exchange=f"jpki.chaos.{unique}.dlx"
    )
    await transport.connect()
    queue = f"chaos-{unique}"
    await transport.declare_queue(queue, ["chaos.#"], delivery_limit=20)

    deliveries: Counter[str] = Counter()
    effects: dict[str, int] = {}
    sent: list[str] = []
    publish_failures = 0

    async def apply_once(delivery: Delivery) -> None:
        deliveries[delivery.message_id] += 1
        if delivery.message_id not in effects:  # the inbox: an effect per message id
            effects[delivery.message_id] = len(effects)
        await delivery.ack()

    async def publish_batch() -> None:
        nonlocal publish_failures
        ids = [f"chaos-{unique}-{n}" for n in range(len(sent), len(sent) + BATCH)]
        batch = [Outgoing("chaos.work", b'{"n":1}', mid) for mid in ids]
        while True:
            try:
                await transport.publish(batch)  # confirmed, or it raised
                break
            except TransportError:
                publish_failures += 1  # not confirmed: publish again (at least once)
                await asyncio.sleep(0.2)
        sent.extend(ids)

    await transport.consume(queue, apply_once, prefetch=100)
    restart: asyncio.Task[float] | None = None
    try:
        while len(sent) < BEFORE:
            await publish_batch()
        restart = asyncio.create_task(asyncio.to_thread(restart_broker, rabbitmqctl))
        while not restart.done():  # keep publishing through the whole outage
            await publish_batch()
            await asyncio.sleep(0.02)
        away = await restart
        target = len(sent) + AFTER
        while len(sent) < target:
            await publish_batch()
        async with asyncio.timeout(120):
            while len(effects) < len(sent):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
    finally:
        if restart is not None and not restart.done():
            await asyncio.gather(restart, return_exceptions=True)
        await transport.delete_topology()
        await transport.close()

    assert publish_failures > 0  # the broker really went away while we published
    assert set(effects) == set(sent)  # every confirmed message consumed: nothing lost
    duplicates = sum(deliveries.values()) - len(sent)
    print(
        f"{len(sent)} messages; broker away {away:.1f}s; {publish_failures} unconfirmed "
        f"publishes re-sent; {duplicates} duplicate deliveries absorbed by id"
    )
