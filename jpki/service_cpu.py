"""CPU used by the shared services (RabbitMQ, Mosquitto, PostgreSQL) on this machine, read
from ``/proc``: a load test's CPU budget counts them beside its own processes."""

from __future__ import annotations

import os
from pathlib import Path

# The shared services a run loads, by the command names of their processes on this machine.
LOCAL_SERVICES = {"rabbitmq": "beam.smp", "mosquitto": "mosquitto", "postgresql": "postgres"}


def _stat(text: str) -> tuple[str, list[int]]:
    """A ``/proc/<pid>/stat`` line: the command name, and utime, stime, cutime and cstime in
    clock ticks (fields 14-17; the name, in parentheses, may itself hold spaces)."""
    head, _, tail = text.rpartition(")")
    return head.partition("(")[2], [int(f) for f in tail.split()[11:15]]


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a live process has used so far, or None where that cannot
    be read."""
    try:
        _, (utime, stime, _, _) = _stat(Path(f"/proc/{pid}/stat").read_text())
    except OSError:
        return None
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def local_service_cpu_seconds(proc: Path = Path("/proc")) -> dict[str, float]:
    """CPU seconds each shared service running on this machine has used so far: every
    process of that name, with the children it has reaped (PostgreSQL's finished backends
    live on in the postmaster's count). A service not running here is left out."""
    names = {command: service for service, command in LOCAL_SERVICES.items()}
    ticks: dict[str, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command, times = _stat((entry / "stat").read_text())
        except OSError:  # gone meanwhile
            continue
        service = names.get(command)
        if service is not None:
            ticks[service] = ticks.get(service, 0) + sum(times)
    return {service: n / os.sysconf("SC_CLK_TCK") for service, n in ticks.items()}


def local_service_cpu_since(before: dict[str, float]) -> dict[str, float]:
    """CPU seconds each service of ``before`` (a ``local_service_cpu_seconds()``) has used
    since; a service that stopped meanwhile is left out."""
    if not before:  # nothing measured at the start (the embedded default): no /proc scan
        return {}
    return {service: seconds - before[service]
            for service, seconds in local_service_cpu_seconds().items() if service in before}
