"""``jpki up`` as a user runs it: every service a child process on the real brokers, kept
apart from whatever else uses them (its own vhost, database, topic root and device ids)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest

from device_sim.fleet import PhoneProfile
from jpki.service_cpu import process_cpu_seconds
from tests.e2e.conftest import MANAGEMENT_URL

pytestmark = [pytest.mark.e2e, pytest.mark.rabbitmq, pytest.mark.mqtt, pytest.mark.postgres]


def _processes_naming(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (the run's data directory
    or name is on every child's command line)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        if marker in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def _stop_leftovers(markers: list[str]) -> list[str]:
    """Stop (by pid) what a run that overran its budget left: this test started them."""
    leftovers = [line for marker in markers for line in _processes_naming(marker)]
    for line in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
    return leftovers


def _up(data_dir: Path, run_name: str, phones: int, report: Path, amqp_url: str,
        mqtt_url: str, pg_url: str) -> str:
    command = [
        sys.executable, "-c", "from jpki.cli import main; main()", "up",
        "--phones", str(phones), "--data-dir", str(data_dir), "--run-name", run_name,
        "--amqp-url", amqp_url, "--management-url", MANAGEMENT_URL, "--mqtt-url", mqtt_url,
        "--db-url", pg_url, "--key-pool", "--seed", "6", "--report", str(report),
        "--startup-timeout", "30", "--fleet-timeout", "45", "--concurrency", "3",
    ]
    # the run's settings come from its options only, not from a developer's environment
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("JPKI_") or name == "JPKI_REQUIRE_SERVICES"}
    up = subprocess.Popen(  # noqa: S603 - our own CLI
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        # about 45 s on an idle machine; the budget leaves room for a loaded one
        output, _ = up.communicate(timeout=100)
    except subprocess.TimeoutExpired:
        up.send_signal(signal.SIGINT)  # unwinds: stops the services, deletes the vhost
        output, _ = up.communicate(timeout=30)
        pytest.fail(f"jpki up overran its budget: {output[-4000:]}")
    finally:
        leftovers = _stop_leftovers([str(data_dir), run_name])
    assert up.returncode == 0, output[-4000:]
    assert leftovers == [], leftovers
    assert "audit: every invariant holds" in output, output[-4000:]
    return output


def test_jpki_up_issues_every_eligible_phone_and_leaves_nothing_running(
    tmp_path: Path, amqp_url: str, mqtt_url: str, pg_url: str, unique: str
) -> None:
    run_name = f"t{unique}"
    data_dir = tmp_path / "up"
    report = tmp_path / "report.json"
    output = _up(data_dir, run_name, 6, report, amqp_url, mqtt_url, pg_url)

    _every_eligible_phone_issued(report, run_name, 6)
    # while the fleet ran (with the shared services), then each process's whole run
    cpu_lines = [line for line in output.splitlines() if line.startswith("up: CPU seconds")]
    assert len(cpu_lines) == 2 and "while the fleet ran" in cpu_lines[0], cpu_lines
    for cpu_line in cpu_lines:
        for process in ("orchestrator", "tsm", "ca", "gateway", "ocsp", "fleet"):
            assert f" {process} " in cpu_line and f" {process} ?" not in cpu_line, cpu_line
    vhosts, databases = asyncio.run(_vhosts_and_databases(amqp_url, pg_url))
    assert f"jpki-{run_name}" not in vhosts
    assert f"jpki_{run_name}" not in databases

    # A second run in the same data directory gets a database of its own, and its CA must
    # not meet the first run's keys there (it refused to start when it did).
    second = f"{run_name}b"
    _up(data_dir, second, 2, tmp_path / "second.json", amqp_url, mqtt_url, pg_url)
    _every_eligible_phone_issued(tmp_path / "second.json", second, 2)


def _every_eligible_phone_issued(report: Path, run_name: str, count: int) -> None:
    phones = json.loads(report.read_text())["phones"]
    assert len(phones) == count
    for phone in phones:
        assert phone["device_id"].startswith(f"{run_name}-")
        if phone["profile"] == PhoneProfile.UNSUPPORTED.value:
            assert phone["outcome"] != "issued" and phone["reason"], phone
        else:
            assert (phone["outcome"], phone["phase"], phone["login"]) == ("issued", 4, "ok"), phone


async def _vhosts_and_databases(amqp_url: str, pg_url: str) -> tuple[set[str], set[str]]:
    amqp = urlsplit(amqp_url)
    auth = aiohttp.encode_basic_auth(amqp.username or "guest", amqp.password or "guest")
    async with aiohttp.ClientSession(headers={"Authorization": auth}) as http:
        async with http.get(f"{MANAGEMENT_URL}/api/vhosts") as answer:
            answer.raise_for_status()
            vhosts = {vhost["name"] for vhost in await answer.json()}
    connection = await asyncpg.connect(pg_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        databases = {row[0] for row in await connection.fetch("SELECT datname FROM pg_database")}
    finally:
        await connection.close()
    return vhosts, databases


def test_cpu_seconds_of_a_process_is_what_it_used() -> None:
    spent = 0
    while time.process_time() < 0.3:  # this test process has used at least 0.3 s of CPU
        spent += 1
    own = process_cpu_seconds(os.getpid())
    assert own is not None and abs(own - time.process_time()) < 0.1
    assert process_cpu_seconds(2**22 + 1) is None  # no such process
