"""``jpki up``: the whole system as separate processes on real services, for a local run.

Starts ``jpki orchestrator``, ``jpki worker tsm``, ``jpki worker ca`` and ``jpki gateway``
as child processes (Boulder's ``startservers.py``), waits until each one consumes its
queue, runs ``jpki fleet`` in the foreground (at most ``--concurrency`` phones applying at
once, as ``jpki run`` does, so the latencies it reports are those of a loaded system and
not of a queue of phones waiting their turn), stops the services (SIGTERM, then SIGKILL
after a grace period), prints the CPU time each process used and runs ``jpki audit`` on
what they left.

A run keeps apart from anything else on the same brokers: its own RabbitMQ virtual host
(made through the management API, deleted at the end), its own PostgreSQL database when
``--db-url`` is given (dropped at the end unless ``--keep``), its own MQTT topic root and
device-id prefix, and a free port for its OCSP responder.
"""

from __future__ import annotations

import asyncio
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import aiohttp
import asyncpg
import click

from infra.bus import GATEWAY_QUEUE
from jpki.run import local_secret
from jpki.service_cpu import local_service_cpu_seconds, process_cpu_seconds

# (name, jpki sub-command, what shows it is ready: the queue it consumes, or "http")
SERVICES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("orchestrator", ("orchestrator",), "orchestrator"),
    ("tsm", ("worker", "tsm"), "tsm"),
    ("ca", ("worker", "ca"), "ca"),
    ("gateway", ("gateway",), GATEWAY_QUEUE),
    ("ocsp", ("ocsp", "serve"), "http"),
)
JPKI = (sys.executable, "-c", "from jpki.cli import main; main()")


class ServiceDidNotStart(click.ClickException):
    pass


@dataclass(frozen=True, slots=True)
class RunPlace:
    """Where one run lives on shared brokers: names no other run uses."""

    name: str  # also the device-id prefix
    topic_root: str
    vhost: str
    database: str
    ocsp_port: int

    @classmethod
    def new(cls, name: str | None = None) -> RunPlace:
        name = name or f"up{secrets.token_hex(4)}"
        return cls(
            name=name,
            topic_root=f"jpki/{name}/dev",
            vhost=f"jpki-{name}",
            database=f"jpki_{name}".replace("-", "_"),
            ocsp_port=_free_port(),
        )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _with_path(url: str, path: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=path))


def _management_api(amqp_url: str, management_url: str | None) -> tuple[str, dict[str, str]]:
    amqp = urlsplit(amqp_url)
    auth = aiohttp.encode_basic_auth(amqp.username or "guest", amqp.password or "guest")
    return (management_url or f"http://{amqp.hostname}:15672").rstrip("/"), {"Authorization": auth}


async def create_vhost(amqp_url: str, management_url: str | None, vhost: str) -> str:
    """Make ``vhost``, let the URL's user use it, return the URL that names it."""
    base, headers = _management_api(amqp_url, management_url)
    user = urlsplit(amqp_url).username or "guest"
    everything = {"configure": ".*", "write": ".*", "read": ".*"}
    async with aiohttp.ClientSession(headers=headers, raise_for_status=True) as http:
        await http.put(f"{base}/api/vhosts/{quote(vhost, safe='')}", json={})
        await http.put(
            f"{base}/api/permissions/{quote(vhost, safe='')}/{quote(user, safe='')}",
            json=everything,
        )
    return _with_path(amqp_url, "/" + quote(vhost, safe=""))


async def delete_vhost(amqp_url: str, management_url: str | None, vhost: str) -> None:
    base, headers = _management_api(amqp_url, management_url)
    async with aiohttp.ClientSession(headers=headers) as http:
        await http.delete(f"{base}/api/vhosts/{quote(vhost, safe='')}")


def _asyncpg_dsn(db_url: str) -> str:
    return db_url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def create_database(db_url: str, database: str) -> str:
    """Make ``database`` on the server of ``db_url``; return the URL that names it."""
    connection = await asyncpg.connect(_asyncpg_dsn(db_url))
    try:
        await connection.execute(f'CREATE DATABASE "{database}"')
    finally:
        await connection.close()
    return _with_path(db_url, "/" + database)


async def drop_database(db_url: str, database: str) -> None:
    connection = await asyncpg.connect(_asyncpg_dsn(db_url))
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await connection.close()


@dataclass(slots=True)
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path


def _environment(
    data_dir: Path, amqp_url: str, mqtt_url: str, db_url: str | None, place: RunPlace
) -> dict[str, str]:
    env = dict(os.environ)
    env["JPKI_AMQP_URL"] = amqp_url
    env["JPKI_MQTT_URL"] = mqtt_url
    env["JPKI_TOPIC_ROOT"] = place.topic_root
    env["JPKI_OCSP_URL"] = f"http://127.0.0.1:{place.ocsp_port}/ocsp"
    env.pop("JPKI_DB_URL", None)
    if db_url:
        env["JPKI_DB_URL"] = db_url
    # Every child reads the run's secrets from the data directory; the CA commands that
    # take the passphrase from the environment get the file's name, never its value.
    local_secret(data_dir, "ca", "JPKI_CA_PASSPHRASE")
    local_secret(data_dir, "tsm", "JPKI_TSM_PASSPHRASE")
    if "JPKI_CA_PASSPHRASE" not in env:
        env["JPKI_CA_PASSPHRASE_FILE"] = str((data_dir / "secrets" / "ca.passphrase").resolve())
    return env


def start_services(
    data_dir: Path, env: dict[str, str], place: RunPlace, names: Sequence[str] | None = None
) -> list[Child]:
    """Start the services; each gets the options it takes (the gateway keeps no data)."""
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    children = []
    for name, command, _queue in SERVICES:
        if names is not None and name not in names:
            continue
        log_path = logs / f"{name}.log"
        out = log_path.open("wb")
        # the gateway's MQTT session is named after the run; it subscribes under the run's
        # topic root (from the environment), so no other run's gateway shares its messages
        if name == "gateway":
            options = ["--name", place.name, "--topic-root", place.topic_root]
        else:
            options = ["--data-dir", str(data_dir)]
        if name == "ocsp":
            options += ["--port", str(place.ocsp_port)]
            if env.get("JPKI_DB_URL"):
                options += ["--db-url", env["JPKI_DB_URL"]]
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and CLI
            [*JPKI, *command, *options],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        children.append(Child(name, process, log_path))
    return children


async def wait_until_consuming(
    amqp_url: str, children: Sequence[Child], startup_timeout: float, ocsp_port: int
) -> None:
    """Health check: every service has a consumer on its queue (and is still alive)."""
    queues = {name: queue for name, _command, queue in SERVICES}
    deadline = time.monotonic() + startup_timeout
    connection = await aio_pika.connect(amqp_url)
    try:
        pending = {child.name for child in children}
        while pending:
            for child in children:
                if child.process.poll() is not None:
                    raise ServiceDidNotStart(
                        f"{child.name} exited with {child.process.returncode}; see {child.log_path}"
                    )
            for name in sorted(pending):
                if queues[name] == "http":
                    if await _listening("127.0.0.1", ocsp_port):
                        pending.discard(name)
                    continue
                channel = await connection.channel()
                try:
                    queue = await channel.declare_queue(queues[name], passive=True)
                    if queue.declaration_result.consumer_count > 0:
                        pending.discard(name)
                except aio_pika.exceptions.ChannelClosed:
                    pass  # not declared yet
                finally:
                    if not channel.is_closed:
                        await channel.close()
            if pending and time.monotonic() > deadline:
                raise ServiceDidNotStart(
                    f"not consuming after {startup_timeout:.0f}s: {sorted(pending)}"
                )
            if pending:
                await asyncio.sleep(0.2)
    finally:
        await connection.close()


async def _listening(host: str, port: int) -> bool:
    try:
        _reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


def children_cpu_seconds() -> float:
    """CPU seconds of every child this process has waited for (``RUSAGE_CHILDREN``)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_summary(used: dict[str, float | None], phones: int, when: str = "") -> str:
    known = {name: seconds for name, seconds in used.items() if seconds is not None}
    total = sum(known.values())
    per_process = ", ".join(
        f"{name} {seconds:.1f}" if seconds is not None else f"{name} ?"
        for name, seconds in used.items()
    )
    return (f"up: CPU seconds{' ' + when if when else ''} {per_process}; total {total:.1f} "
            f"({1000 * total / max(1, phones):.0f} ms per phone)")


def _window_cpu(children: Sequence[Child]) -> dict[str, float | None]:
    """CPU seconds so far of the run's services and of the shared services on this machine."""
    return ({child.name: process_cpu_seconds(child.process.pid) for child in children}
            | local_service_cpu_seconds())


def _less(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def stop_services(children: Sequence[Child], grace: float = 10.0) -> dict[str, int | None]:
    for child in children:
        if child.process.poll() is None:
            os.killpg(child.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    codes: dict[str, int | None] = {}
    for child in children:
        try:
            codes[child.name] = child.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(child.process.pid, signal.SIGKILL)
            codes[child.name] = child.process.wait()
    return codes


@click.command("up")
@click.option("--phones", type=int, default=50, show_default=True)
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("data-up"),
              show_default=True)
@click.option("--amqp-url", envvar="JPKI_AMQP_URL", default="amqp://guest:guest@127.0.0.1:5672/",
              show_default=True, help="the broker; the run makes its own virtual host on it")
@click.option("--management-url", envvar="JPKI_RABBITMQ_MANAGEMENT_URL", default=None,
              help="RabbitMQ management API (default http://<amqp host>:15672)")
@click.option("--mqtt-url", envvar="JPKI_MQTT_URL", default="mqtt://127.0.0.1:1883",
              show_default=True)
@click.option("--db-url", envvar="JPKI_DB_URL", default=None,
              help="PostgreSQL server URL (the run makes its own database on it); "
                   "default SQLite files in --data-dir")
@click.option("--run-name", default=None,
              help="names the run's vhost, database, topic root and devices (default random)")
@click.option("--keep", is_flag=True, help="keep the run's PostgreSQL database afterwards")
@click.option("--report", type=click.Path(path_type=Path), default=None)
@click.option("--seed", type=int, default=None)
@click.option("--key-pool", is_flag=True, help="SE key pairs from the pre-generated pool")
@click.option("--concurrency", type=click.IntRange(min=1), default=32, show_default=True,
              help="phones applying at once (admission control, as jpki run)")
@click.option("--startup-timeout", type=float, default=60.0, show_default=True)
@click.option("--fleet-timeout", type=float, default=300.0, show_default=True,
              help="how long a phone waits for its saga's end")
def up_command(
    phones: int, data_dir: Path, amqp_url: str, management_url: str | None, mqtt_url: str,
    db_url: str | None, run_name: str | None, keep: bool, report: Path | None,
    seed: int | None, key_pool: bool, concurrency: int, startup_timeout: float,
    fleet_timeout: float,
) -> None:
    """Start every service as its own process on RabbitMQ + MQTT (+ PostgreSQL), run a
    fleet of PHONES against them, stop them and audit the stores."""
    place = RunPlace.new(run_name)
    if db_url:
        # The run's PostgreSQL database is its own, made now and dropped at the end: its
        # CA keys and secrets must be its own too. Beside another run's key files, the new
        # CA would find keys its database does not know and refuse to start.
        data_dir = data_dir / place.name
    # SIGTERM unwinds like Ctrl-C, so the children are stopped and the vhost is deleted
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(128 + signal.SIGTERM))
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        run_amqp_url = asyncio.run(create_vhost(amqp_url, management_url, place.vhost))
    except aiohttp.ClientError as exc:
        raise click.ClickException(
            f"cannot make the run's virtual host through the RabbitMQ management API "
            f"(--management-url): {type(exc).__name__}: {exc}"
        ) from None
    run_db_url = None
    try:
        if db_url:
            run_db_url = asyncio.run(create_database(db_url, place.database))
        click.echo(f"up: run {place.name}: vhost {place.vhost}, topic root {place.topic_root}"
                   + (f", database {place.database}" if run_db_url else "")
                   + f", files in {data_dir}")
        code = _run(place, phones, data_dir, run_amqp_url, mqtt_url, run_db_url, report, seed,
                    key_pool, concurrency, startup_timeout, fleet_timeout)
    finally:
        asyncio.run(delete_vhost(amqp_url, management_url, place.vhost))
        if db_url and run_db_url and not keep:
            asyncio.run(drop_database(db_url, place.database))
    sys.exit(code)


def _run(
    place: RunPlace, phones: int, data_dir: Path, amqp_url: str, mqtt_url: str,
    db_url: str | None, report: Path | None, seed: int | None, key_pool: bool,
    concurrency: int, startup_timeout: float, fleet_timeout: float,
) -> int:
    env = _environment(data_dir, amqp_url, mqtt_url, db_url, place)
    # the CA's store and keys first: the CA worker and the OCSP responder would both
    # create generation 1 of a fresh CA at once
    init = [*JPKI, "ca", "init", "--data-dir", str(data_dir)]
    if db_url:
        init += ["--db-url", db_url]
    if subprocess.call(init, env=env, stdout=subprocess.DEVNULL) != 0:  # noqa: S603
        raise click.ClickException("jpki ca init failed")
    children = start_services(data_dir, env, place)
    fleet_code = 1
    used: dict[str, float | None] = {}
    try:
        asyncio.run(wait_until_consuming(amqp_url, children, startup_timeout, place.ocsp_port))
        click.echo(f"up: {', '.join(c.name for c in children)} consuming; starting the fleet")
        fleet = [*JPKI, "fleet", "--phones", str(phones), "--data-dir", str(data_dir),
                 "--topic-root", place.topic_root, "--device-prefix", place.name,
                 "--timeout", str(fleet_timeout), "--concurrency", str(concurrency)]
        if report is not None:
            fleet += ["--report", str(report)]
        if seed is not None:
            fleet += ["--seed", str(seed)]
        if key_pool:
            fleet.append("--key-pool")
        waited_before = children_cpu_seconds()
        window_before = _window_cpu(children)
        fleet_process = subprocess.Popen(fleet, env=env)  # noqa: S603 - our own CLI
        try:
            fleet_code = fleet_process.wait()
            used["fleet"] = children_cpu_seconds() - waited_before
            window = {name: _less(seconds, window_before.get(name))
                      for name, seconds in _window_cpu(children).items()}
            click.echo(cpu_summary({**window, "fleet": used["fleet"]}, phones,
                                   "while the fleet ran"))
        finally:
            if fleet_process.poll() is None:  # interrupted: the fleet goes with us
                fleet_process.terminate()
                try:
                    fleet_process.wait(10)
                except subprocess.TimeoutExpired:
                    fleet_process.kill()
                    fleet_process.wait()
    finally:
        # read before the stop: a process's /proc entry goes once it has been waited for
        used = {child.name: process_cpu_seconds(child.process.pid) for child in children} | used
        codes = stop_services(children)
        click.echo("up: stopped " + ", ".join(f"{n} ({c})" for n, c in codes.items()))
        click.echo(cpu_summary(used, phones))
    audit = [*JPKI, "audit", "--data-dir", str(data_dir)]
    audit_code = subprocess.call(audit, env=env)  # noqa: S603 - our own CLI
    return fleet_code or audit_code
