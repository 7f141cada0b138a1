"""The machine description and calibration every bench reports beside its figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from jpki.bench.machine import calibration, machine


def test_machine_names_cores_python_and_load() -> None:
    described = machine()
    assert described.startswith(f"{os.cpu_count()} cores, ")
    assert "Python 3." in described and "load average " in described


def test_calibration_times_both_reference_workloads() -> None:
    figures = calibration()
    assert set(figures) == {"rsa2048_sign_ms", "python_reference_ms"}
    # an RSA-2048 private-key operation takes between ~0.1 and a few ms on any current CPU
    assert 0.01 < figures["rsa2048_sign_ms"] < 50
    assert 0.1 < figures["python_reference_ms"] < 5_000


def test_embedded_issuance_bench_reports_its_calibration(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from jpki.cli import main; main()", "bench", "issuance",
         "--phones", "4", "--concurrency", "2", "--key-pool", "4",
         "--data-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    figures = json.loads(done.stdout)
    assert figures["backend"] == "embedded"
    assert figures["saga_statuses"] == {"completed": 4} and figures["audit_findings"] == 0
    assert figures["calibration"]["rsa2048_sign_ms"] > 0
    assert figures["calibration"]["python_reference_ms"] > 0
