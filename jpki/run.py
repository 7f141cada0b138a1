"""``jpki run``: the main job — everything in one process on the embedded default.

In-process transport, SQLite files in the data directory (kept: ``jpki audit`` and
``jpki ca export`` read them afterwards), the orchestrator, the SP-TSM and CA workers, the
in-process phone link and a fleet with a mix of profiles. Live progress, then a summary:
phones per outcome, certificates issued, per-step latency percentiles, failures with
reasons and the phase-4 login of every issued phone; ``--report`` writes it as JSON.

The embedded secrets (CA key passphrase, TSM key-file passphrase) are generated on the
first run and kept in ``<data dir>/secrets/`` (mode 0600) unless ``JPKI_CA_PASSPHRASE`` /
``JPKI_TSM_PASSPHRASE`` are set: a local run must be repeatable and inspectable, e.g.
``JPKI_CA_PASSPHRASE_FILE=<data dir>/secrets/ca.passphrase jpki ca export ...``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import click
import structlog
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from device_sim.fleet import (
    CERTIFICATE_CHOICES,
    CaCardFactory,
    Fleet,
    FleetConfig,
    NetworkFaults,
    PhoneProfile,
    PhoneResult,
    parse_mix,
)
from device_sim.relying_party import HttpOcspClient, RelyingParty
from device_sim.se.jpki_applet import GeneratedKeys, KeySource, PooledKeys
from infra import eventloop
from infra.bus import SERVICE_QUEUES, Bus, declare_topology
from infra.db import Database
from infra.heap import start_up_objects_frozen
from infra.logging import configure_logging
from infra.transport.base import Transport
from infra.transport.inprocess import InProcessTransport
from infra.transport.phone_link import InProcessPhoneHub
from jpki import audit as audit_mod
from jpki.report import Latency, SagaMeasurements, measure_sagas
from jpki.service_cpu import local_service_cpu_seconds, local_service_cpu_since
from orchestrator.flows.issuance import FLOW_NAME
from orchestrator.service import Orchestrator
from workers.ca.authority import CertificateAuthority
from workers.ca.http import serve as serve_ca_http
from workers.ca.keystore import Passphrase
from workers.ca.profiles import CaKind
from workers.ca.service import CaWorker
from workers.tsm.keys import MasterKeyRing, MasterKeys, load_key_file, write_key_file

log = structlog.get_logger("run")

DEFAULT_PROFILE_MIX = "new=70,second_hand=10,reinstalled=10,unsupported=10"
DEFAULT_CERTIFICATE_MIX = "both=80,auth=10,sign=10"


def run_until_signal(main: Coroutine[Any, Any, Any]) -> Any:
    """Run ``main``; SIGINT/SIGTERM cancel it so its ``finally`` blocks close cleanly."""

    async def guarded() -> Any:
        task = asyncio.ensure_future(main)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            return await task

    return eventloop.run(guarded())


# ---------------------------------------------------------------------------------------
# Local secrets and keys of an embedded run


def local_secret(data_dir: Path, name: str, env: str) -> bytes:
    value = os.environ.get(env)
    if value:
        return value.encode()
    path = data_dir / "secrets" / f"{name}.passphrase"
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fresh = secrets.token_urlsafe(32).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(fresh)
    return fresh


def tsm_key_ring(data_dir: Path) -> MasterKeyRing:
    passphrase = local_secret(data_dir, "tsm", "JPKI_TSM_PASSPHRASE")
    path = data_dir / "tsm-master-keys.json"
    if not path.exists():
        ring = MasterKeyRing({1: MasterKeys.generate(1)}, current=1)
        write_key_file(path, ring, passphrase)
    return load_key_file(path, passphrase)


# ---------------------------------------------------------------------------------------
# The run


@dataclass(slots=True)
class RunSettings:
    phones: int
    data_dir: Path
    seed: int
    profile_mix: str = DEFAULT_PROFILE_MIX
    certificate_mix: str = DEFAULT_CERTIFICATE_MIX
    pin_option_mix: str = "4=1"
    key_pool: int | None = None  # size of the pre-generated key pool, None: generate
    concurrency: int | None = None
    latency_s: float = 0.0
    drop_rate: float = 0.0
    disconnect_rate: float = 0.0
    login: bool = True
    device_prefix: str = "phone"
    key_pool_dir: Path | None = None  # default <data dir>/key-pool


@dataclass(slots=True)
class RunOutcome:
    settings: dict[str, Any]
    summary: dict[str, Any]
    step_latency: dict[str, dict[str, float]]
    saga_latency: dict[str, float]
    saga_statuses: dict[str, int]
    audit: list[dict[str, str]]
    phones: list[dict[str, Any]] = field(default_factory=list)


def key_sources(settings: RunSettings) -> tuple[KeySource, KeySource]:
    if settings.key_pool:
        directory = settings.key_pool_dir or settings.data_dir / "key-pool"
        pool = PooledKeys(settings.key_pool, directory, random.Random(settings.seed))
        return pool, pool
    return GeneratedKeys(), GeneratedKeys()


@dataclass(frozen=True, slots=True)
class Services:
    """Where the stack runs: nothing (embedded default) or real brokers and a database.

    ``amqp_url`` None: the in-process transport. ``mqtt_url`` None: phones on the in-process
    phone link (over whichever transport), else each phone its own MQTT session bridged by
    a gateway. ``db_url`` None: SQLite files in the data directory, else PostgreSQL with
    each service in schema ``<service><schema_suffix>``.
    """

    amqp_url: str | None = None
    mqtt_url: str | None = None
    db_url: str | None = None
    schema_suffix: str = ""
    topic_root: str = "jpki/dev"

    def database(self, service: str, data_dir: Path) -> Database:
        if self.db_url is None:
            return Database.for_service(service, data_dir=data_dir)
        return Database.for_service(service, url=self.db_url,
                                    schema=f"{service}{self.schema_suffix}")


EMBEDDED = Services()


async def run_embedded(
    settings: RunSettings, on_result: Callable[[PhoneResult], None] | None = None,
    on_ready: Callable[[int], None] | None = None,
) -> RunOutcome:
    return await run_stack(settings, EMBEDDED, on_result=on_result, on_ready=on_ready)


async def open_transport(services: Services, connection_name: str) -> Transport:
    """The in-process transport, or RabbitMQ when ``services`` names it; connected, with the
    service queues declared."""
    transport: Transport
    if services.amqp_url is None:
        transport = InProcessTransport()
    else:
        from infra.transport.rabbitmq import RabbitMQTransport

        transport = RabbitMQTransport(services.amqp_url, connection_name=connection_name)
    await transport.connect()
    await declare_topology(transport, SERVICE_QUEUES)
    return transport


async def run_stack(
    settings: RunSettings, services: Services, *,
    on_result: Callable[[PhoneResult], None] | None = None,
    on_ready: Callable[[int], None] | None = None,
    on_transport: Callable[[Transport], Coroutine[Any, Any, None]] | None = None,
    on_fleet: Callable[[Fleet], None] | None = None,
    with_services_up: Callable[[], Awaitable[None]] | None = None,
    check: bool = True,
) -> RunOutcome:
    """Orchestrator, TSM and CA workers, the phone link and the fleet, in this process.

    ``with_services_up`` is awaited with every service up, before this process's phones
    start: replicas of a run wait there for each other, and phones run by another process
    run there. ``check=False`` leaves out measuring the sagas and auditing the stores: a
    replica sharing its brokers and databases with others that are still running leaves
    that to whoever started them all."""
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    embedded = services == EMBEDDED
    transport = await open_transport(services, "jpki-run")
    if on_transport is not None:
        await on_transport(transport)
    bus = Bus(transport)

    ca_db = services.database("ca", data_dir)
    ca = await CertificateAuthority.open(
        data_dir, Passphrase(local_secret(data_dir, "ca", "JPKI_CA_PASSPHRASE")), db=ca_db
    )
    ring = tsm_key_ring(data_dir)
    se_keys, card_keys = key_sources(settings)
    cards = CaCardFactory(ca)
    config = FleetConfig(
        phones=settings.phones,
        profile_mix=parse_mix(settings.profile_mix, [p.value for p in PhoneProfile]),
        certificate_mix=parse_mix(settings.certificate_mix, CERTIFICATE_CHOICES),
        pin_option_mix=parse_mix(settings.pin_option_mix, [str(n) for n in range(1, 7)]),
        faults=NetworkFaults(latency_s=settings.latency_s, drop_rate=settings.drop_rate,
                             disconnect_rate=settings.disconnect_rate),
        seed=settings.seed,
        device_prefix=settings.device_prefix,
    )
    fleet = await asyncio.to_thread(
        Fleet.manufacture, config, ring, cards.issuer_for,
        se_key_source=se_keys, card_key_source=card_keys,
    )
    await cards.record()
    if on_fleet is not None:
        on_fleet(fleet)

    orchestrator_db = services.database("orchestrator", data_dir)
    tsm_db = services.database("tsm", data_dir)
    # Not seeded: the saga ids and the application nonces come from it, and a second run in
    # the same data directory would repeat them (the CA refuses a used nonce). --seed makes
    # the fleet reproducible, not the back end.
    orchestrator = Orchestrator(orchestrator_db, transport)
    ca_worker = CaWorker(ca, transport)
    tsm_worker = await make_tsm_worker(tsm_db, transport, ring)
    hub: InProcessPhoneHub | None = None
    gateway: Any = None
    make_link: Callable[[str], Any]
    if services.mqtt_url is None:
        hub = InProcessPhoneHub(bus)
        make_link = hub.link
    else:
        from infra.mqtt import MqttPhoneLink
        from workers.gateway.service import Gateway

        mqtt_url, root = services.mqtt_url, services.topic_root
        gateway = Gateway(transport, mqtt_url, topic_root=root)

        def make_link(device_id: str) -> Any:
            return MqttPhoneLink(mqtt_url, device_id, topic_root=root)

    http = await serve_ca_http(ca, "127.0.0.1", 0)
    port = http.addresses[0][1]
    session = aiohttp.ClientSession()
    relying_party = RelyingParty(
        [ca.issuer(CaKind.AUTH).certificate], HttpOcspClient(session),
        ocsp_url=f"http://127.0.0.1:{port}/ocsp",
    )
    try:
        await orchestrator.start()
        await ca_worker.start()
        await tsm_worker.start()
        if hub is not None:
            await hub.start()
        if gateway is not None:
            await gateway.start()
        if on_ready is not None:
            on_ready(len(fleet.phones))
        # frozen before with_services_up: with the phones in another process, the whole
        # load runs there
        with start_up_objects_frozen():
            if with_services_up is not None:
                await with_services_up()
            services_started = local_service_cpu_seconds() if not embedded else {}
            started, cpu_started = time.time(), time.process_time()
            await fleet.run(make_link, relying_party=relying_party if settings.login else None,
                            concurrency=settings.concurrency, on_result=on_result)
            wall, cpu = time.time() - started, time.process_time() - cpu_started
            services_cpu = local_service_cpu_since(services_started)
        await _settle(orchestrator, timeout_s=30.0)
    finally:
        await session.close()
        await http.cleanup()
        if gateway is not None:
            await gateway.stop()
        if hub is not None:
            await hub.close()
        await tsm_worker.stop()
        await ca_worker.stop()
        await orchestrator.stop()
        await transport.close()
    await asyncio.to_thread(fleet.save, data_dir)
    measured, violations = SagaMeasurements({}, [], {}, None, None), []
    if check:
        measured, violations = await measure_and_audit(orchestrator_db, ca.database, tsm_db,
                                                       data_dir)
    await orchestrator_db.close()
    await tsm_db.close()
    await ca.close()
    outcome = _outcome(settings, fleet, measured, violations, wall)
    # CPU of this whole process (every service and every phone) while the fleet ran: on a
    # shared machine the load decides the wall figures, this one much less
    outcome.summary["process_cpu_s"] = round(cpu, 2)
    # the shared services this run used, where they run on this machine (empty embedded)
    outcome.summary["service_cpu_s"] = {name: round(s, 2) for name, s in services_cpu.items()}
    return outcome


async def measure_and_audit(
    orchestrator: Database, ca: Database, tsm: Database, data_dir: Path,
) -> tuple[SagaMeasurements, list[audit_mod.Violation]]:
    """The run's saga latencies, and every invariant its stores break."""
    measured = await measure_sagas(orchestrator, FLOW_NAME)
    violations = await audit_mod.audit_stores(
        orchestrator=orchestrator, ca=ca, tsm=tsm, phones=data_dir / "phones",
    )
    return measured, violations


async def _settle(orchestrator: Orchestrator, timeout_s: float) -> None:
    """Wait until no saga is still running (compensations finish after the phone gave up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counts = await orchestrator.engine.counts()
        if not counts.get("running") and not counts.get("compensating"):
            return
        await asyncio.sleep(0.1)


def _outcome(
    settings: RunSettings, fleet: Fleet, measured: SagaMeasurements,
    violations: list[audit_mod.Violation], wall: float,
) -> RunOutcome:
    summary = asdict(fleet.summary())
    summary["wall_s"] = round(wall, 3)
    return outcome_of(
        {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()},
        summary, measured, violations, phones=[asdict(r) for r in fleet.results],
    )


def outcome_of(
    settings: dict[str, Any], summary: dict[str, Any], measured: SagaMeasurements,
    violations: list[audit_mod.Violation], phones: list[dict[str, Any]] | None = None,
) -> RunOutcome:
    """A run's outcome: its summary, its sagas' latencies and statuses, its audit."""

    def rounded(values: list[float]) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(Latency.of(values)).items()}

    return RunOutcome(
        settings=settings,
        summary=summary,
        step_latency={step: rounded(values)
                      for step, values in sorted(measured.step_seconds.items())},
        saga_latency=rounded(measured.saga_seconds),
        saga_statuses=measured.statuses,
        audit=[v.to_json() for v in violations],
        phones=phones or [],
    )


async def make_tsm_worker(db: Database, transport: Transport, ring: MasterKeyRing) -> Any:
    from workers.tsm.service import TsmWorker

    return TsmWorker(db, transport, ring)


# ---------------------------------------------------------------------------------------
# The command: live progress, then the summary


def render_summary(outcome: RunOutcome, console: Console) -> None:
    s = outcome.summary
    table = Table(title="phones per outcome", show_header=True)
    table.add_column("profile")
    outcomes = sorted({o for per in s["by_profile"].values() for o in per})
    for name in outcomes:
        table.add_column(name, justify="right")
    for profile, per in sorted(s["by_profile"].items()):
        table.add_row(profile, *(str(per.get(o, 0)) for o in outcomes))
    console.print(table)
    console.print(
        f"[bold]{s['certificates_issued']}[/] certificates issued in {s['wall_s']:.2f} s: "
        f"[bold]{s['issuances_per_s']:.1f}[/] issuances/s, "
        f"[bold]{s['certificates_per_s']:.1f}[/] certificates/s; saga latency "
        f"p50 {outcome.saga_latency['p50']:.3f} s, p95 {outcome.saga_latency['p95']:.3f} s; "
        f"peak memory {s['max_rss_mib']:.0f} MiB"
    )
    steps = Table(title="per-step latency (s, first send → done)")
    for column in ("step", "n", "p50", "p95", "p99", "max"):
        steps.add_column(column, justify="left" if column == "step" else "right")
    for step, lat in outcome.step_latency.items():
        steps.add_row(step, str(lat["count"]), f"{lat['p50']:.4f}", f"{lat['p95']:.4f}",
                      f"{lat['p99']:.4f}", f"{lat['max']:.4f}")
    console.print(steps)
    console.print("phase-4 logins: " + ", ".join(f"{k}: {v}" for k, v in s["logins"].items()))
    if s["failures"]:
        failures = Table(title="phones that did not reach phase 4")
        for column in ("device", "profile", "outcome", "reason"):
            failures.add_column(column)
        for f in s["failures"]:
            failures.add_row(f["device_id"], f["profile"], f["outcome"], str(f["reason"]))
        console.print(failures)
    if outcome.audit:
        for v in outcome.audit:
            console.print(f"[red]audit: BROKEN {v['invariant']}: {v['subject']}: {v['detail']}")
    else:
        console.print("audit: every invariant holds")


@click.command("run")
@click.option("--phones", type=int, default=100, show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("data"),
              show_default=True, help="SQLite stores, keys and phones; kept after the run")
@click.option("--report", type=click.Path(path_type=Path), default=None,
              help="write the summary and every phone's result as JSON")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--profiles", default=DEFAULT_PROFILE_MIX, show_default=True,
              help="profile mix: new, second_hand, reinstalled, unsupported")
@click.option("--certificates", default=DEFAULT_CERTIFICATE_MIX, show_default=True,
              help="certificate mix: both, auth, sign")
@click.option("--pin-options", default="4=1", show_default=True,
              help="PIN-setting option mix (3 and 4 for production)")
@click.option("--key-pool", type=int, default=None, metavar="SIZE",
              help="PRE-GENERATED KEY POOL of SIZE RSA keys for SE and card keys (speed; "
                   "keys repeat: benchmarks only)")
@click.option("--concurrency", type=click.IntRange(min=1), default=32, show_default=True,
              help="phones in flight at once (more outgrow the SP-TSM's queue and time out)")
@click.option("--latency", type=float, default=0.0, help="added network latency, seconds")
@click.option("--drop-rate", type=float, default=0.0, help="share of SP-TSM traffic lost")
@click.option("--disconnect-rate", type=float, default=0.0,
              help="share of phones that lose their link mid-saga")
@click.option("--log-level", default="WARNING", show_default=True,
              help="log lines go to <data dir>/run.log")
def run_command(
    phones: int, data_dir: Path, report: Path | None, seed: int, profiles: str,
    certificates: str, pin_options: str, key_pool: int | None, concurrency: int | None,
    latency: float, drop_rate: float, disconnect_rate: float, log_level: str,
) -> None:
    """Everything in one process on the embedded default: N phones from phase 1 to 4."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_file = (data_dir / "run.log").open("a", encoding="utf-8")
    configure_logging("run", level=log_level, pretty=False, stream=log_file)
    settings = RunSettings(
        phones=phones, data_dir=data_dir, seed=seed, profile_mix=profiles,
        certificate_mix=certificates, pin_option_mix=pin_options, key_pool=key_pool,
        concurrency=concurrency, latency_s=latency, drop_rate=drop_rate,
        disconnect_rate=disconnect_rate,
    )
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[tally]}"), TimeElapsedColumn(), console=console,
    )
    tally: dict[str, int] = {}
    task = progress.add_task("manufacturing phones and cards", total=phones, tally="")

    def ready(count: int) -> None:
        progress.update(task, description="issuing", total=count)

    def done(result: PhoneResult) -> None:
        tally[result.outcome] = tally.get(result.outcome, 0) + 1
        progress.update(task, advance=1,
                        tally=" ".join(f"{k}={v}" for k, v in sorted(tally.items())))

    with progress:
        outcome = run_until_signal(run_embedded(settings, on_result=done, on_ready=ready))
    if outcome is None:
        raise click.Abort()
    render_summary(outcome, Console())
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(asdict(outcome), indent=2, ensure_ascii=False, default=str))
    if outcome.audit:
        sys.exit(1)
