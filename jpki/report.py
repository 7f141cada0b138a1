"""What a run measured, read back from the orchestrator's store: outcomes, step latencies,
saga latencies, throughput. Shared by ``jpki run``, ``jpki up`` and the end-to-end tests.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import select

from infra.db.database import Database
from orchestrator.saga.tables import saga_timeline, sagas


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class Latency:
    count: int
    p50: float
    p95: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Latency:
        return cls(len(values), percentile(values, 50), percentile(values, 95),
                   percentile(values, 99), max(values, default=0.0))


@dataclass(frozen=True, slots=True)
class PhoneOutcome:
    device_id: str
    profile: str
    outcome: str  # issued | refused | failed | cancelled | unfinished
    phase: int
    reason: str | None
    certificates: list[str]
    login: str | None  # phase 4 at the relying party: "ok", a refusal code, or None
    applet_deleted_first: bool | None = None  # phase 2 clean-up seen (second-hand, reinstall)


@dataclass(slots=True)
class RunReport:
    phones: int
    seconds: float
    outcomes: dict[str, int]
    certificates_issued: int
    issuances_per_second: float
    certificates_per_second: float
    saga_latency: Latency
    step_latency: dict[str, Latency]
    failures: list[dict[str, Any]]
    logins: dict[str, int]
    per_phone: list[PhoneOutcome] = field(default_factory=list)
    audit: list[dict[str, str]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False, default=str)


@dataclass(frozen=True, slots=True)
class SagaMeasurements:
    statuses: dict[str, int]
    saga_seconds: list[float]  # start → completed, completed sagas only
    step_seconds: dict[str, list[float]]  # step → first send … done
    first_start: float | None
    last_end: float | None


async def measure_sagas(db: Database, flow: str) -> SagaMeasurements:
    """Saga and per-step latencies from the saga table and its timeline."""
    async with db.transaction() as conn:
        rows = (await conn.execute(
            select(sagas.c.saga_id, sagas.c.status, sagas.c.created_at, sagas.c.updated_at)
            .where(sagas.c.flow == flow)
        )).all()
        timeline = (await conn.execute(
            select(saga_timeline.c.saga_id, saga_timeline.c.at, saga_timeline.c.event,
                   saga_timeline.c.step)
            .where(saga_timeline.c.event.in_(("sent", "waiting", "done")))
            .order_by(saga_timeline.c.id)
        )).all()
    ids = {row.saga_id for row in rows}
    statuses = Counter(row.status for row in rows)
    completed = [row for row in rows if row.status == "completed"]
    started: dict[tuple[str, str], float] = {}
    steps: dict[str, list[float]] = defaultdict(list)
    for entry in timeline:
        if entry.saga_id not in ids or entry.step is None:
            continue
        key = (entry.saga_id, entry.step)
        if entry.event in ("sent", "waiting"):
            started.setdefault(key, entry.at)  # first attempt: retries count in the latency
        elif key in started:
            steps[entry.step].append(entry.at - started.pop(key))
    return SagaMeasurements(
        statuses=dict(statuses),
        saga_seconds=[row.updated_at - row.created_at for row in completed],
        step_seconds=dict(steps),
        first_start=min((row.created_at for row in rows), default=None),
        last_end=max((row.updated_at for row in rows), default=None),
    )


def build_report(
    phones: Sequence[PhoneOutcome], measured: SagaMeasurements, seconds: float,
    *, settings: dict[str, Any] | None = None,
) -> RunReport:
    outcomes = Counter(p.outcome for p in phones)
    issued = [p for p in phones if p.outcome == "issued"]
    certificates = sum(len(p.certificates) for p in issued)
    logins = Counter(p.login or "not attempted" for p in issued)
    failures = [
        {"device_id": p.device_id, "profile": p.profile, "outcome": p.outcome,
         "phase": p.phase, "reason": p.reason}
        for p in phones if p.outcome != "issued"
    ]
    return RunReport(
        phones=len(phones),
        seconds=seconds,
        outcomes=dict(sorted(outcomes.items())),
        certificates_issued=certificates,
        issuances_per_second=len(issued) / seconds if seconds > 0 else 0.0,
        certificates_per_second=certificates / seconds if seconds > 0 else 0.0,
        saga_latency=Latency.of(measured.saga_seconds),
        step_latency={step: Latency.of(v) for step, v in sorted(measured.step_seconds.items())},
        failures=failures,
        logins=dict(logins),
        per_phone=list(phones),
        settings=settings or {},
    )
