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
import multiprocessing
import os
import queue
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import click

from device_sim.se.jpki_applet import default_data_dir
from infra import eventloop
from jpki.bench.machine import calibration, machine
from jpki.run import (
    RunOutcome,
    RunSettings,
    Services,
    measure_and_audit,
    outcome_of,
    run_stack,
)
from jpki.service_cpu import local_service_cpu_seconds, local_service_cpu_since
from jpki.up import create_database, drop_database


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
                 management_url: str, processes: int = 1,
                 fleet_process: bool = False) -> dict[str, object]:
    tag = uuid.uuid4().hex[:8]
    if services is None:
        outcome = await run_stack(settings, Services())
    else:
        vhost_url = await _vhost(management_url, amqp_url, f"jpki-bench-{tag}", create=True)
        # the phones' MQTT client ids derive from their device ids: two runs at once on one
        # broker with the same ids would take each other's sessions over, again and again
        settings = dataclasses.replace(settings, device_prefix=f"bench{tag}")
        server_url, database = services.db_url, None
        db_url, schema_suffix = server_url, f"_bench_{tag}"
        if fleet_process:  # a database of its own: `jpki fleet` finds the CA in schema "ca"
            database = f"jpki_bench_{tag}"
            db_url, schema_suffix = await create_database(server_url, database), ""
        services = Services(amqp_url=vhost_url, mqtt_url=services.mqtt_url,
                            db_url=db_url, schema_suffix=schema_suffix,
                            topic_root=f"jpki-bench-{tag}/dev")
        try:
            if fleet_process:
                outcome = await _fleet_apart(settings, services)
            elif processes == 1:
                outcome = await run_stack(settings, services)
            else:
                outcome = await _replicas(settings, services, processes)
        finally:
            if database is not None:
                await drop_database(server_url, database)
            else:
                for service in ("orchestrator", "tsm", "ca"):
                    db = services.database(service, settings.data_dir)
                    await db.drop_schema()
                    await db.close()
            await _vhost(management_url, amqp_url, f"jpki-bench-{tag}", create=False)
    s = outcome.summary
    return {
        "backend": "embedded" if services is None else "rabbitmq+mosquitto+postgresql",
        "processes": processes,
        "fleet_process": fleet_process,
        "phones": settings.phones,
        "concurrency": settings.concurrency,
        "issued": outcome.saga_statuses.get("completed", 0),
        "saga_statuses": outcome.saga_statuses,
        "wall_s": s["wall_s"],
        "issuances_per_s": round(outcome.saga_statuses.get("completed", 0) / s["wall_s"], 2),
        "certificates_per_s": round(s["certificates_issued"] / s["wall_s"], 2),
        "process_cpu_ms_per_issuance": round(
            1000 * s["process_cpu_s"] / max(1, outcome.saga_statuses.get("completed", 0)), 1),
        **_services_cpu(s["service_cpu_s"], s["process_cpu_s"], s.get("fleet_cpu_s"),
                        outcome.saga_statuses.get("completed", 0)),
        "saga_latency_s": outcome.saga_latency,
        "step_latency_p50_s": {k: v["p50"] for k, v in outcome.step_latency.items()},
        "audit_findings": len(outcome.audit),
        "machine": machine(),
        "load_average": os.getloadavg(),
    }


# ---------------------------------------------------------------------------------------
# The phones in a process of their own (`jpki fleet`), the services in this one


async def _fleet_apart(settings: RunSettings, services: Services) -> RunOutcome:
    """Every service in this process, the phones in a ``jpki fleet`` process of their own:
    the load generator beside the system under test rather than inside it, as a load test
    runs. The window is the fleet's run (its phones manufactured): this process's CPU and
    the shared services' over it, the fleet's own from its report."""
    report = settings.data_dir / "fleet-report.json"
    window: dict[str, Any] = {}

    async def run_fleet() -> None:
        command = [
            sys.executable, "-c", "from jpki.cli import main; main()", "fleet",
            "--phones", str(settings.phones), "--data-dir", str(settings.data_dir),
            "--topic-root", services.topic_root, "--device-prefix", settings.device_prefix,
            "--profile-mix", settings.profile_mix, "--certificate-mix", settings.certificate_mix,
            "--pin-options", settings.pin_option_mix, "--typo-rate", "0",
            "--concurrency", str(settings.concurrency or settings.phones),
            "--key-pool", "--key-pool-size", str(settings.key_pool or 64),
            "--seed", str(settings.seed), "--no-login", "--report", str(report),
        ]
        # the URLs may hold passwords: in the environment, not on the command line
        child = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "JPKI_DB_URL": str(services.db_url),
                 "JPKI_MQTT_URL": str(services.mqtt_url)})
        assert child.stdout is not None
        lines: list[bytes] = []
        while line := await child.stdout.readline():  # manufactured: the phones start now
            lines.append(line)
            if line.startswith(b"fleet: ") and line.rstrip().endswith(b"running"):
                break
        window["services"] = local_service_cpu_seconds()
        window["cpu"] = time.process_time()
        lines.append(await child.stdout.read())
        await child.wait()
        window["cpu"] = time.process_time() - window["cpu"]
        window["services"] = local_service_cpu_since(window["services"])
        if child.returncode != 0 or not report.exists():
            tail = b"".join(lines).decode(errors="replace")[-2000:]
            raise click.ClickException(f"the fleet process failed ({child.returncode}): {tail}")

    outcome = await run_stack(dataclasses.replace(settings, phones=0), services,
                              with_services_up=run_fleet)
    fleet = json.loads(report.read_text())["summary"]
    outcome.summary = {
        "wall_s": fleet["wall_s"],
        "certificates_issued": fleet["certificates_issued"],
        "process_cpu_s": round(window["cpu"], 2),
        "fleet_cpu_s": fleet["process_cpu_s"],
        "service_cpu_s": {name: round(s, 2) for name, s in window["services"].items()},
    }
    return outcome


# ---------------------------------------------------------------------------------------
# Replicas: the whole stack in each of several processes, sharing brokers and databases


def _share(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


async def _replicas(settings: RunSettings, services: Services, processes: int) -> RunOutcome:
    """Run the stack in ``processes`` processes at once, each with every service and its
    share of the phones and of the concurrency, on the same virtual host, schemas and topic
    root: the services' queues, outboxes and timers are shared the way replicas share
    them in a deployment (competing consumers, ``SKIP LOCKED``). The replicas open the
    stores one after another (the first creates the CA and the schemas), start their fleets
    together, and this process measures the sagas and audits the stores once all are done."""
    context = multiprocessing.get_context("spawn")  # no fork of a process running a loop
    events = context.Queue()
    go = context.Event()
    children = []
    try:
        for index in range(processes):
            replica = dataclasses.replace(
                settings,
                phones=_share(settings.phones, processes, index),
                concurrency=max(1, _share(settings.concurrency or settings.phones, processes,
                                          index)),
                seed=settings.seed + index,
                device_prefix=f"{settings.device_prefix}r{index}",
            )
            child = context.Process(target=_replica_main, args=(index, replica, services,
                                                                events, go), daemon=True)
            child.start()
            children.append(child)
            await _next_event(events, children, expect="ready")
        services_started = local_service_cpu_seconds()
        go.set()
        summaries = [await _next_event(events, children, expect="done")
                     for _ in range(processes)]
        services_cpu = local_service_cpu_since(services_started)
    finally:
        for child in children:
            child.join(timeout=60)
            if child.is_alive():
                child.kill()
    dbs = [services.database(name, settings.data_dir) for name in ("orchestrator", "ca", "tsm")]
    try:
        measured, violations = await measure_and_audit(*dbs, settings.data_dir)
    finally:
        for db in dbs:
            await db.close()
    return outcome_of(
        {"replicas": processes},
        {
            "wall_s": max(s["wall_s"] for s in summaries),
            "certificates_issued": sum(s["certificates_issued"] for s in summaries),
            "process_cpu_s": round(sum(s["process_cpu_s"] for s in summaries), 2),
            "service_cpu_s": {name: round(s, 2) for name, s in services_cpu.items()},
        },
        measured, violations,
    )


async def _next_event(events: Any, children: list[Any], *, expect: str) -> Any:
    """The next report from a replica; a replica that failed or died fails the run."""
    while True:
        try:
            kind, index, payload = await asyncio.to_thread(events.get, timeout=1.0)
        except queue.Empty:
            dead = [c for c in children if not c.is_alive() and c.exitcode != 0]
            if dead:
                raise click.ClickException(
                    f"a replica exited with status {dead[0].exitcode}") from None
            continue
        if kind == "failed":
            raise click.ClickException(f"replica {index} failed: {payload}")
        if kind != expect:
            raise click.ClickException(f"replica {index} reported {kind!r}, not {expect!r}")
        return payload


def _replica_main(index: int, settings: RunSettings, services: Services, events: Any,
                  go: Any) -> None:
    """One replica (a spawned process): every service and its phones, until its fleet is
    done; reports ``ready`` once its services run and ``done`` with its summary."""
    from infra.logging import configure_logging

    configure_logging("bench", level="WARNING", pretty=False)

    async def wait_for_go() -> None:
        events.put(("ready", index, None))
        await asyncio.to_thread(go.wait)

    try:
        outcome = eventloop.run(run_stack(settings, services, with_services_up=wait_for_go,
                                          check=False))
    except BaseException as exc:
        events.put(("failed", index, type(exc).__name__))
        raise
    events.put(("done", index, outcome.summary))


def _services_cpu(services: dict[str, float], process_s: float, fleet_s: float | None,
                  issued: int) -> dict[str, object]:
    """The shared services' CPU while the fleet ran, per issuance, and the whole machine's
    budget with this process (and the fleet's, when the phones ran apart): on two cores,
    2000 / total ms is the ceiling of issuances/s."""
    if not services:
        return {}
    per = {name: round(1000 * seconds / max(1, issued), 1) for name, seconds in services.items()}
    total = 1000 * (process_s + (fleet_s or 0.0) + sum(services.values())) / max(1, issued)
    figures: dict[str, object] = {"service_cpu_ms_per_issuance": per}
    if fleet_s is not None:
        figures["fleet_process_cpu_ms_per_issuance"] = round(1000 * fleet_s / max(1, issued), 1)
    figures["total_cpu_ms_per_issuance"] = round(total, 1)
    return figures


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
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="real services only: the whole stack in this many processes at once, "
                   "sharing the phones, the concurrency, the queues and the databases")
@click.option("--fleet-process", is_flag=True,
              help="real services only: the phones in a `jpki fleet` process of their own, "
                   "every service in this one")
def issuance_bench(
    phones: int, concurrency: int, backend: str, amqp_url: str, mqtt_url: str, db_url: str,
    management_url: str, key_pool: int, data_dir: Path | None, seed: int, processes: int,
    fleet_process: bool,
) -> None:
    """New issuances (both certificates, new phones) per second and saga latency p50/p95."""
    from infra.logging import configure_logging

    if (processes > 1 or fleet_process) and backend == "embedded":
        raise click.UsageError("--processes and --fleet-process need --services real: the "
                               "embedded default's broker lives inside its one process")
    if processes > 1 and fleet_process:
        raise click.UsageError("--processes and --fleet-process are two layouts: choose one")
    configure_logging("bench", level="WARNING", pretty=False)
    with tempfile.TemporaryDirectory(prefix="jpki-bench-") as scratch:
        settings = RunSettings(
            phones=phones, data_dir=data_dir or Path(scratch), seed=seed, profile_mix="new=1",
            certificate_mix="both=1", key_pool=key_pool, concurrency=concurrency, login=False,
            key_pool_dir=default_data_dir() / "key-pool",  # kept across benchmark runs
        )
        services = None if backend == "embedded" else Services(mqtt_url=mqtt_url, db_url=db_url)
        reference = calibration()  # before the run, on an idle process
        started = time.time()
        figures = eventloop.run(_bench(settings, services, amqp_url, management_url, processes,
                                       fleet_process))
        figures["total_s_including_manufacture"] = round(time.time() - started, 1)
        figures["calibration"] = reference
    click.echo(json.dumps(figures, indent=2, default=str))
