"""``jpki bench issuance --services real`` in its two multi-process layouts.

``--processes 2``: two processes, each the whole stack and half the fleet, on one virtual
host, one set of schemas and one topic root. The services' replica rules are what this
exercises: competing consumers on every queue, the outbox and the timers shared with
``SKIP LOCKED``, an SE's script answered in whichever TSM replica the queue hands it to, one
gateway forwarding to every phone.

``--fleet-process``: every service in the bench's process, the phones in a ``jpki fleet``
process of their own (phase 4 left out), as a load generator runs beside what it loads.

Either way every phone must be issued and the audit of the stores must find nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.e2e.conftest import MANAGEMENT_URL

pytestmark = [pytest.mark.e2e, pytest.mark.rabbitmq, pytest.mark.mqtt, pytest.mark.postgres]


def test_two_replicas_share_the_work_and_leave_consistent_stores(
    amqp_url: str, mqtt_url: str, pg_url: str, tmp_path
) -> None:
    command = [
        sys.executable, "-c", "from jpki.cli import main; main()", "bench", "issuance",
        "--services", "real", "--processes", "2", "--phones", "8", "--concurrency", "4",
        "--amqp-url", amqp_url, "--management-url", MANAGEMENT_URL, "--mqtt-url", mqtt_url,
        "--db-url", pg_url, "--data-dir", str(tmp_path / "run"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads(done.stdout)
    assert figures["processes"] == 2
    assert figures["issued"] == 8 and figures["saga_statuses"] == {"completed": 8}
    assert figures["audit_findings"] == 0
    # both replicas' phones: 8 issuances with two certificates each
    assert figures["certificates_per_s"] == pytest.approx(2 * figures["issuances_per_s"], 0.01)
    # each replica's phones are its own (device ids carry the replica's index)
    elements = [p.name for p in (tmp_path / "run" / "phones").glob("*.se.json")]
    assert sorted(name.split("-")[0][-2:] for name in elements) == ["r0"] * 4 + ["r1"] * 4
    assert set(figures["service_cpu_ms_per_issuance"]) <= {"rabbitmq", "mosquitto", "postgresql"}


def test_phones_in_a_process_of_their_own(
    amqp_url: str, mqtt_url: str, pg_url: str, tmp_path
) -> None:
    command = [
        sys.executable, "-c", "from jpki.cli import main; main()", "bench", "issuance",
        "--services", "real", "--fleet-process", "--phones", "6", "--concurrency", "3",
        "--amqp-url", amqp_url, "--management-url", MANAGEMENT_URL, "--mqtt-url", mqtt_url,
        "--db-url", pg_url, "--data-dir", str(tmp_path / "run"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads(done.stdout)
    assert figures["fleet_process"] is True
    assert figures["issued"] == 6 and figures["saga_statuses"] == {"completed": 6}
    assert figures["audit_findings"] == 0
    assert figures["fleet_process_cpu_ms_per_issuance"] > 0
    # the fleet process's own report: every phone issued, none tried phase 4
    report = json.loads((tmp_path / "run" / "fleet-report.json").read_text())
    assert report["summary"]["outcomes"] == {"issued": 6}
    assert report["summary"]["logins"] == {"not_tried": 6}


def test_replicas_need_the_real_services(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from jpki.cli import main; main()", "bench", "issuance",
         "--processes", "2", "--phones", "2"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "--processes and --fleet-process need --services real" in done.stderr
