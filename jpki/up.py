"""``jpki up``: the whole system as separate processes on real services, for a local run.

Starts ``jpki orchestrator``, ``jpki worker tsm``, ``jpki worker ca`` and ``jpki gateway``
as child processes (Boulder's ``startservers.py``), waits until each one consumes its
queue, runs ``jpki fleet`` in the foreground, stops the services (SIGTERM, then SIGKILL
after a grace period) and runs ``jpki audit`` on what they left.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import click

from infra.bus import GATEWAY_QUEUE
from jpki.run import local_secret

OCSP_PORT = 8080

# (name, jpki sub-command, what shows it is ready: the queue it consumes, or "http")
SERVICES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("orchestrator", ("orchestrator",), "orchestrator"),
    ("tsm", ("worker", "tsm"), "tsm"),
    ("ca", ("worker", "ca"), "ca"),
    ("gateway", ("gateway",), GATEWAY_QUEUE),
    ("ocsp", ("ocsp", "serve", "--port", str(OCSP_PORT)), "http"),
)
JPKI = (sys.executable, "-c", "from jpki.cli import main; main()")


class ServiceDidNotStart(click.ClickException):
    pass


@dataclass(slots=True)
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path


def _environment(
    data_dir: Path, amqp_url: str, mqtt_url: str, db_url: str | None
) -> dict[str, str]:
    env = dict(os.environ)
    env["JPKI_AMQP_URL"] = amqp_url
    env["JPKI_MQTT_URL"] = mqtt_url
    env["JPKI_OCSP_URL"] = f"http://127.0.0.1:{OCSP_PORT}/ocsp"
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
    data_dir: Path, env: dict[str, str], names: Sequence[str] | None = None
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
        # a stable gateway name: its persistent MQTT session is reused run after run, rather
        # than each run leaving one more member in the shared subscription, which the
        # broker keeps handing its share of the phones' messages (mosquitto issue #1747)
        options = ["--name", "jpki-up"] if name == "gateway" else ["--data-dir", str(data_dir)]
        if name == "ocsp" and env.get("JPKI_DB_URL"):
            options += ["--db-url", env["JPKI_DB_URL"]]
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and CLI
            [*JPKI, *command, *options],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        children.append(Child(name, process, log_path))
    return children


async def wait_until_consuming(
    amqp_url: str, children: Sequence[Child], startup_timeout: float
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
                    if await _listening("127.0.0.1", OCSP_PORT):
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
              show_default=True)
@click.option("--mqtt-url", envvar="JPKI_MQTT_URL", default="mqtt://127.0.0.1:1883",
              show_default=True)
@click.option("--db-url", envvar="JPKI_DB_URL", default=None,
              help="PostgreSQL URL; default SQLite files in --data-dir")
@click.option("--report", type=click.Path(path_type=Path), default=None)
@click.option("--seed", type=int, default=None)
@click.option("--key-pool", is_flag=True, help="SE key pairs from the pre-generated pool")
@click.option("--startup-timeout", type=float, default=60.0, show_default=True)
def up_command(
    phones: int, data_dir: Path, amqp_url: str, mqtt_url: str, db_url: str | None,
    report: Path | None, seed: int | None, key_pool: bool, startup_timeout: float,
) -> None:
    """Start every service as its own process on RabbitMQ + MQTT (+ PostgreSQL), run a
    fleet of PHONES against them, stop them and audit the stores."""
    data_dir.mkdir(parents=True, exist_ok=True)
    env = _environment(data_dir, amqp_url, mqtt_url, db_url)
    # the CA's store and keys first: the CA worker and the OCSP responder would both
    # create generation 1 of a fresh CA at once
    init = [*JPKI, "ca", "init", "--data-dir", str(data_dir)]
    if db_url:
        init += ["--db-url", db_url]
    if subprocess.call(init, env=env, stdout=subprocess.DEVNULL) != 0:  # noqa: S603
        raise click.ClickException("jpki ca init failed")
    children = start_services(data_dir, env)
    fleet_code = 1
    try:
        asyncio.run(wait_until_consuming(amqp_url, children, startup_timeout))
        click.echo(f"up: {', '.join(c.name for c in children)} consuming; starting the fleet")
        fleet = [*JPKI, "fleet", "--phones", str(phones), "--data-dir", str(data_dir)]
        if report is not None:
            fleet += ["--report", str(report)]
        if seed is not None:
            fleet += ["--seed", str(seed)]
        if key_pool:
            fleet.append("--key-pool")
        fleet_code = subprocess.call(fleet, env=env)  # noqa: S603 - our own CLI
    finally:
        codes = stop_services(children)
        click.echo("up: stopped " + ", ".join(f"{n} ({c})" for n, c in codes.items()))
    audit = [*JPKI, "audit", "--data-dir", str(data_dir)]
    audit_code = subprocess.call(audit, env=env)  # noqa: S603 - our own CLI
    sys.exit(fleet_code or audit_code)
