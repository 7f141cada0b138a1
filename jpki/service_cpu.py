"""CPU used by the shared services (RabbitMQ, Mosquitto, PostgreSQL) on this machine, read
from ``/proc``: a load test's CPU budget counts them beside its own processes."""

from __future__ import annotations

import os
from pathlib import Path

# The shared services a run loads, by the command names of their processes on this machine.
LOCAL_SERVICES = {"rabbitmq": "beam.smp", "mosquitto": "mosquitto", "postgresql": "postgres"}


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
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        head, _, tail = stat.rpartition(")")
        service = names.get(head.partition("(")[2])
        if service is None:
            continue
        # after the ")": state is field 3; utime, stime, cutime, cstime are fields 14-17
        fields = tail.split()
        ticks[service] = ticks.get(service, 0) + sum(int(f) for f in fields[11:15])
    return {service: n / os.sysconf("SC_CLK_TCK") for service, n in ticks.items()}


def local_service_cpu_since(before: dict[str, float]) -> dict[str, float]:
    """CPU seconds each service of ``before`` (a ``local_service_cpu_seconds()``) has used
    since; a service that stopped meanwhile is left out."""
    return {service: seconds - before[service]
            for service, seconds in local_service_cpu_seconds().items() if service in before}
