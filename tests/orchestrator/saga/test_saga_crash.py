"""Crash test: orchestrator and participant killed with SIGKILL mid-run, then restarted.

Both run as real processes of ``python -m orchestrator.demo`` on RabbitMQ, each with its
own SQLite file (and, in the second case, PostgreSQL schemas). After the restart every saga
must end completed or compensated, and the participant's effect log must hold each effect
exactly once.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from infra.db import Database
from infra.transport.rabbitmq import RabbitMQTransport
from orchestrator.demo.participant import effect_log
from orchestrator.saga.tables import sagas

pytestmark = [pytest.mark.rabbitmq]

ROOT = Path(__file__).resolve().parents[3]
SAGAS = 200
REJECT_EVERY = 7


def _spawn(role: str, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with log.open("ab") as out:
        return subprocess.Popen(  # noqa: S603 - our own module, fixed arguments
            [sys.executable, "-m", "orchestrator.demo", role, *args],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )


async def _statuses(db: Database) -> dict[str, int]:
    query = select(sagas.c.status, func.count()).group_by(sagas.c.status)
    async with db.transaction() as conn:
        return dict((await conn.execute(query)).all())


async def _wait(db: Database, done, within: float) -> dict[str, int]:
    deadline = time.monotonic() + within
    while True:
        try:
            counts = await _statuses(db)
        except Exception:  # tables not created yet by the orchestrator process
            counts = {}
        if done(counts):
            return counts
        if time.monotonic() > deadline:
            raise AssertionError(f"no progress in time: {counts}")
        await asyncio.sleep(0.05)


def _kill(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
    for proc in procs:
        proc.wait(10)


def _stop(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.parametrize(
    "store", ["sqlite", pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.slow])]
)
async def test_sigkill_mid_run_every_saga_ends_and_no_effect_twice(
    store, amqp_url, unique, tmp_path, request
):
    common = ["--amqp-url", amqp_url, "--exchange", f"jpki-crash-{unique}",
              "--queue-prefix", f"{unique}-", "--data-dir", str(tmp_path)]
    if store == "postgres":
        pg_url = request.getfixturevalue("pg_url")
        orch_db = Database(pg_url, schema=f"crash_o_{unique}")
        part_db = Database(pg_url, schema=f"crash_p_{unique}")
        orch_args = [*common, "--db-url", pg_url, "--schema", f"crash_o_{unique}"]
        part_args = [*common, "--db-url", pg_url, "--schema", f"crash_p_{unique}"]
    else:
        orch_db = Database.for_service("orchestrator", data_dir=tmp_path)
        part_db = Database.for_service("demo_participant", data_dir=tmp_path)
        orch_args, part_args = common, common
    # ~600 commands at 3 ms each: the run lasts seconds, so the kill below finds sagas
    # mid-flight even on a machine that would otherwise finish all of them between two polls
    part_args = [*part_args, "--work-ms", "3"]
    orch_args = [*orch_args, "--start", str(SAGAS), "--reject-every", str(REJECT_EVERY),
                 "--timeout", "5"]
    log = tmp_path / "processes.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs = [_spawn("participant", part_args, log), _spawn("orchestrator", orch_args, log)]
        # kill both while sagas are in every state: some ended, most still running
        before = await _wait(orch_db, lambda c: 20 <= c.get("completed", 0) + c.get(
            "compensated", 0) and sum(c.values()) >= 100, within=90)
        _kill(*procs)
        assert before.get("running", 0) + before.get("compensating", 0) > 0, before
        procs = [_spawn("participant", part_args, log), _spawn("orchestrator", orch_args, log)]
        after = await _wait(orch_db, lambda c: c.get("completed", 0) + c.get(
            "compensated", 0) == SAGAS, within=120)
        _stop(*procs)
        rejected = sum(1 for i in range(SAGAS) if i % REJECT_EVERY == REJECT_EVERY - 1)
        assert after == {"completed": SAGAS - rejected, "compensated": rejected}, (
            after, log.read_text()[-3000:])
        effects = await effect_log(part_db)
    finally:
        _stop(*procs)
        await _remove_broker_topology(amqp_url, unique)
        if store == "postgres":
            await orch_db.drop_schema()
            await part_db.drop_schema()
        await orch_db.close()
        await part_db.close()
    counted = collections.Counter(effects)
    assert max(counted.values()) == 1, [e for e, n in counted.items() if n > 1]
    per_saga = collections.defaultdict(list)
    for saga_id, step, action in effects:
        per_saga[saga_id].append((step, action))
    for i in range(SAGAS):
        got = per_saga[f"demo-{i:06d}"]
        if i % REJECT_EVERY == REJECT_EVERY - 1:
            assert got == [("reserve", "do"), ("reserve", "undo")], (i, got)
        else:
            assert got == [("reserve", "do"), ("charge", "do"), ("ship", "do")], (i, got)


async def _remove_broker_topology(amqp_url: str, unique: str) -> None:
    transport = RabbitMQTransport(amqp_url, exchange=f"jpki-crash-{unique}",
                                  dead_letter_exchange=f"jpki-crash-{unique}.dlx")
    await transport.connect()
    try:
        for queue, keys in ((f"{unique}-demo-orchestrator", ["demo.reply.#"]),
                            (f"{unique}-demo-participant", ["demo.cmd.#"])):
            await transport.declare_queue(queue, keys)
        await transport.delete_topology()
    finally:
        await transport.close()
