"""``jpki bench issuance``: whole new issuances per second and saga latency, measured.

Runs the main job's stack (orchestrator, TSM and CA workers, the phone link, a fleet of
new phones applying for both certificates, SE and card keys from the PRE-GENERATED POOL)
either on the embedded default or on RabbitMQ + Mosquitto + PostgreSQL. On the real
services the run is isolated: its own RabbitMQ virtual host (management API), its own
PostgreSQL schemas, its own MQTT topic root and device ids (so its phones' MQTT client
ids too), all removed afterwards. It prints the figures with the machine and its load
average, because on a shared 2-core box the load decides them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import click

from device_sim.se.jpki_applet import default_data_dir
from jpki.bench.saga import machine
from jpki.run import RunSettings, Services, run_stack


async def _vhost(management_url: str, amqp_url: str, name: str, *, create: bool) -> str:
    parts = urlsplit(amqp_url)
    user, password = parts.username or "guest", parts.password or "guest"
    headers = {"Authorization": aiohttp.encode_basic_auth(user, password)}
    vhost = quote(name, safe="")
    async with aiohttp.ClientSession(headers=headers) as http:
        if create:
            async with http.put(f"{management_url}/api/vhosts/{vhost}") as answer:
                answer.raise_for_status()
            async with http.put(f"{management_url}/api/permissions/{vhost}/{quote(user)}",
                                json={"configure": ".*", "write": ".*", "read": ".*"}) as answer:
                answer.raise_for_status()
        else:
            async with http.delete(f"{management_url}/api/vhosts/{vhost}") as answer:
                answer.raise_for_status()
    return urlunsplit((parts.scheme, parts.netloc, "/" + vhost, "", ""))


async def _bench(settings: RunSettings, services: Services | None, amqp_url: str,
                 management_url: str) -> dict[str, object]:
    tag = uuid.uuid4().hex[:8]
    if services is None:
        outcome = await run_stack(settings, Services())
    else:
        vhost_url = await _vhost(management_url, amqp_url, f"jpki-bench-{tag}", create=True)
        # the phones' MQTT client ids derive from their device ids: two runs at once on one
        # broker with the same ids would take each other's sessions over, again and again
        settings = dataclasses.replace(settings, device_prefix=f"bench{tag}")
        services = Services(amqp_url=vhost_url, mqtt_url=services.mqtt_url,
                            db_url=services.db_url, schema_suffix=f"_bench_{tag}",
                            topic_root=f"jpki-bench-{tag}/dev")
        try:
            outcome = await run_stack(settings, services)
        finally:
            for service in ("orchestrator", "tsm", "ca"):
                db = services.database(service, settings.data_dir)
                await db.drop_schema()
                await db.close()
            await _vhost(management_url, amqp_url, f"jpki-bench-{tag}", create=False)
    s = outcome.summary
    return {
        "backend": "embedded" if services is None else "rabbitmq+mosquitto+postgresql",
        "phones": settings.phones,
        "concurrency": settings.concurrency,
        "issued": outcome.saga_statuses.get("completed", 0),
        "saga_statuses": outcome.saga_statuses,
        "wall_s": s["wall_s"],
        "issuances_per_s": round(outcome.saga_statuses.get("completed", 0) / s["wall_s"], 2),
        "certificates_per_s": round(s["certificates_issued"] / s["wall_s"], 2),
        "process_cpu_ms_per_issuance": round(
            1000 * s["process_cpu_s"] / max(1, outcome.saga_statuses.get("completed", 0)), 1),
        "saga_latency_s": outcome.saga_latency,
        "step_latency_p50_s": {k: v["p50"] for k, v in outcome.step_latency.items()},
        "audit_findings": len(outcome.audit),
        "machine": machine(),
        "load_average": os.getloadavg(),
    }


@click.command("issuance")
@click.option("--phones", type=int, default=200, show_default=True)
@click.option("--concurrency", type=int, default=50, show_default=True,
              help="phones applying at once (admission control)")
@click.option("--services", "backend", type=click.Choice(["embedded", "real"]),
              default="embedded", show_default=True)
@click.option("--amqp-url", envvar="JPKI_AMQP_URL", default="amqp://guest:guest@127.0.0.1:5672/",
              show_default=True)
@click.option("--mqtt-url", envvar="JPKI_MQTT_URL", default="mqtt://127.0.0.1:1883",
              show_default=True)
@click.option("--db-url", envvar="JPKI_DB_URL",
              default="postgresql+asyncpg://postgres@127.0.0.1:5432/test", show_default=True)
@click.option("--management-url", default="http://127.0.0.1:15672", show_default=True)
@click.option("--key-pool", type=int, default=64, show_default=True,
              help="size of the PRE-GENERATED KEY POOL (SE and card keys)")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="default: a temporary directory")
@click.option("--seed", type=int, default=1, show_default=True)
def issuance_bench(
    phones: int, concurrency: int, backend: str, amqp_url: str, mqtt_url: str, db_url: str,
    management_url: str, key_pool: int, data_dir: Path | None, seed: int,
) -> None:
    """New issuances (both certificates, new phones) per second and saga latency p50/p95."""
    from infra.logging import configure_logging

    configure_logging("bench", level="WARNING", pretty=False)
    with tempfile.TemporaryDirectory(prefix="jpki-bench-") as scratch:
        settings = RunSettings(
            phones=phones, data_dir=data_dir or Path(scratch), seed=seed, profile_mix="new=1",
            certificate_mix="both=1", key_pool=key_pool, concurrency=concurrency, login=False,
            key_pool_dir=default_data_dir() / "key-pool",  # kept across benchmark runs
        )
        services = None if backend == "embedded" else Services(mqtt_url=mqtt_url, db_url=db_url)
        started = time.time()
        figures = asyncio.run(_bench(settings, services, amqp_url, management_url))
        figures["total_s_including_manufacture"] = round(time.time() - started, 1)
    click.echo(json.dumps(figures, indent=2, default=str))
