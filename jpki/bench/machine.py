"""The machine a benchmark ran on, described and calibrated.

A figure such as "issuances per second" says as much about the CPU as about the code. Every
bench prints ``machine()`` beside its figures, and the issuance bench also reports
``calibration()``: two fixed workloads timed on this machine just before the run, so that
figures from different machines can be compared as ratios.

- ``rsa2048_sign_ms``: one RSA-2048 PKCS#1 v1.5 SHA-256 signature (OpenSSL through
  cryptography), the operation the phones' SEs, the cards and the CA repeat in every
  issuance;
- ``python_reference_ms``: a fixed pure-Python workload (building and reading 100,000 small
  dicts), standing for the interpreter work that makes up most of an issuance's CPU.

Each is the median of several rounds, so a single preempted round does not move it.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

_ROUNDS = 7
_SIGNATURES_PER_ROUND = 40
_REFERENCE_ITEMS = 100_000


def machine() -> str:
    """Cores, CPU model, Python version and load average, on one line."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or model
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}, "
            f"load average {load}")


def calibration() -> dict[str, float]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    message = b"calibration" * 8

    def sign() -> None:
        for _ in range(_SIGNATURES_PER_ROUND):
            key.sign(message, padding.PKCS1v15(), hashes.SHA256())

    def reference() -> None:
        total = 0
        for i in range(_REFERENCE_ITEMS):
            record = {"id": i, "name": f"phone-{i}", "step": "s09_issue"}
            total += len(record["name"]) + (record["id"] & 7)
        if total <= 0:  # uses the loop's result, so no step of it is dead
            raise AssertionError(total)

    return {
        "rsa2048_sign_ms": round(_median_ms(sign, _SIGNATURES_PER_ROUND), 4),
        "python_reference_ms": round(_median_ms(reference, 1), 2),
    }


def _median_ms(work: Callable[[], None], operations: int) -> float:
    """Milliseconds per operation, the median over the rounds."""
    times = []
    for _ in range(_ROUNDS):
        start = time.perf_counter()
        work()
        times.append((time.perf_counter() - start) * 1000 / operations)
    return statistics.median(times)
