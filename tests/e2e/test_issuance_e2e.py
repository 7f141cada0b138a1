"""New issuance end to end, with every real part: orchestrator, SP-TSM, JPKI CA, gateway,
the fleet's apps, SEs and My Number Cards, the relying party and its OCSP checks.

- on the embedded default (in-process transport and phone link, SQLite);
- on RabbitMQ + Mosquitto + PostgreSQL, at least 50 phones of mixed profiles and
  certificate choices;
- a capture of everything on the MQTT broker (``#``) and every AMQP message on the
  exchange (a tap queue bound ``#``) during a run: no user PIN or password in any payload
  in any encoding; temporary PINs only on the TSM → app path.

Every run ends with ``jpki audit`` over every store and requires no finding.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import aiomqtt
import pytest
from click.testing import CliRunner

from device_sim.app import DELETED_MARK
from device_sim.fleet import Fleet, applet_deleted_first
from infra.mqtt import MqttAddress
from infra.transport.base import Transport
from jpki.audit import audit_command
from jpki.run import RunOutcome, RunSettings, Services, run_embedded, run_stack
from protocol.envelope import InvalidMessage, decode
from tests.e2e.secrets_scan import Captured, scan

pytestmark = pytest.mark.e2e

MIX = "new=50,second_hand=20,reinstalled=20,unsupported=10"
CERTIFICATES = "both=60,auth=20,sign=20"


def check_every_phone(outcome: RunOutcome) -> None:
    """Every eligible phone reaches phase 4 and logs in; second-hand and reinstalled phones
    had their applet deleted first; unsupported phones end with a clear reason; nothing
    else happens (no other saga outcome, no stray deletion, no audit finding)."""
    phones = outcome.phones
    assert phones, "no phone ran"
    for p in phones:
        who = f"{p['device_id']} ({p['profile']}, {p['certificates']})"
        if p["profile"] == "unsupported":
            ending = (p["outcome"], p["phase"], p["reason"])
            assert ending == ("refused", 1, "unsupported_model"), who
            assert p["scripts"] == [], who  # the SE was never touched
            continue
        assert (p["outcome"], p["phase"]) == ("issued", 4), f"{who}: {p['outcome']} {p['reason']}"
        if p["certificates"] in ("both", "auth"):
            assert p["login"] == "ok", f"{who}: login {p['login']}"
        if p["profile"] in ("second_hand", "reinstalled"):
            assert applet_deleted_first(p["scripts"]), f"{who}: {p['scripts']}"
        else:
            assert not any(op.endswith(DELETED_MARK) for op in p["scripts"]), who
    profiles = Counter(p["profile"] for p in phones)
    earlier = profiles["second_hand"] + profiles["reinstalled"]  # their earlier issuance
    issued = len(phones) - profiles["unsupported"]
    assert outcome.saga_statuses == {
        **({"completed": issued + earlier} if issued + earlier else {}),
        **({"compensated": profiles["unsupported"]} if profiles["unsupported"] else {}),
    }
    assert outcome.audit == [], outcome.audit


async def test_a_second_run_in_the_same_data_directory_issues_too(tmp_path: Path) -> None:
    # the README's main command, run twice: the second run's applications must not reuse
    # the first run's nonces (the CA refuses a used nonce as a replay)
    for _ in range(2):
        settings = RunSettings(phones=4, data_dir=tmp_path, seed=60, profile_mix="new=1",
                               certificate_mix="both=1", key_pool=8)
        outcome = await run_embedded(settings)
        assert [p["outcome"] for p in outcome.phones] == ["issued"] * 4, outcome.phones


async def test_mixed_fleet_on_the_embedded_default(tmp_path: Path) -> None:
    settings = RunSettings(phones=20, data_dir=tmp_path, seed=61, profile_mix=MIX,
                           certificate_mix=CERTIFICATES, key_pool=24)
    outcome = await run_embedded(settings)
    check_every_phone(outcome)
    assert {p["profile"] for p in outcome.phones} == {
        "new", "second_hand", "reinstalled", "unsupported"}
    assert {p["certificates"] for p in outcome.phones} == {"both", "auth", "sign"}
    # the stores stay for inspection, and jpki audit reads them: break two invariants on
    # purpose and see each named, by the command and with its exit code
    assert {"orchestrator.db", "ca.db", "tsm.db"} <= set(os.listdir(tmp_path))
    clean = await asyncio.to_thread(CliRunner().invoke, audit_command,
                                    ["--data-dir", str(tmp_path)])
    assert clean.exit_code == 0, clean.output
    assert "every invariant holds" in clean.output
    issued = next(p for p in outcome.phones
                  if p["outcome"] == "issued" and p["profile"] == "new")
    with sqlite3.connect(tmp_path / "orchestrator.db") as db:
        saga_id, data = db.execute(
            "SELECT saga_id, data FROM sagas WHERE status = 'completed' AND data LIKE ?",
            (f'%"device_id":"{issued["device_id"]}"%',),
        ).fetchall()[-1]
        db.execute("UPDATE sagas SET status = 'compensated' WHERE saga_id = ?", (saga_id,))
    serials = {c["serial"] for c in json.loads(data)["issued"]}
    (tmp_path / "phones" / f"{issued['device_id']}.se.json").unlink()  # the phone is gone
    broken = await asyncio.to_thread(CliRunner().invoke, audit_command,
                                     ["--data-dir", str(tmp_path), "--json"])
    assert broken.exit_code == 1, broken.output
    found = json.loads(broken.output)["violations"]
    named = {(v["invariant"], v["subject"]) for v in found}
    assert named == {("certificate_left_by_compensated_saga", s) for s in serials} | {
        ("active_certificate_without_key", s) for s in serials}


def _services(amqp_vhost_url: str, mqtt_url: str, pg_url: str, unique: str) -> Services:
    return Services(amqp_url=amqp_vhost_url, mqtt_url=mqtt_url, db_url=pg_url,
                    schema_suffix=f"_e2e_{unique}", topic_root=f"jpki-e2e-{unique}/dev")


async def _drop_schemas(services: Services, data_dir: Path) -> None:
    for service in ("orchestrator", "tsm", "ca"):
        db = services.database(service, data_dir)
        await db.drop_schema()
        await db.close()


@pytest.mark.rabbitmq
@pytest.mark.mqtt
@pytest.mark.postgres
@pytest.mark.slow
async def test_fifty_mixed_phones_on_rabbitmq_mosquitto_postgresql(
    tmp_path: Path, amqp_vhost_url: str, mqtt_url: str, pg_url: str, unique: str
) -> None:
    services = _services(amqp_vhost_url, mqtt_url, pg_url, unique)
    settings = RunSettings(phones=50, data_dir=tmp_path, seed=62, profile_mix=MIX,
                           certificate_mix=CERTIFICATES, key_pool=24,
                           device_prefix=f"e{unique}")
    try:
        outcome = await run_stack(settings, services)
    finally:
        await _drop_schemas(services, tmp_path)
    check_every_phone(outcome)
    assert len(outcome.phones) == 50
    assert Counter(p["profile"] for p in outcome.phones) == {
        "new": 25, "second_hand": 10, "reinstalled": 10, "unsupported": 5}


class Capture:
    """Everything on the MQTT broker and every message through the AMQP exchange."""

    def __init__(self, mqtt_url: str) -> None:
        self.items: list[Captured] = []
        self._mqtt = MqttAddress.from_url(mqtt_url)
        self._tasks: list[asyncio.Task[None]] = []
        self._amqp: Any = None
        self.mqtt_ready = asyncio.Event()

    async def start_mqtt(self) -> None:
        self._tasks.append(asyncio.create_task(self._mqtt_loop()))
        await asyncio.wait_for(self.mqtt_ready.wait(), 10)

    async def _mqtt_loop(self) -> None:
        async with aiomqtt.Client(self._mqtt.hostname, self._mqtt.port,
                                  username=self._mqtt.username,
                                  password=self._mqtt.password) as client:
            await client.subscribe("#", qos=1)
            self.mqtt_ready.set()
            async for message in client.messages:
                payload = message.payload
                raw = payload if isinstance(payload, bytes) else str(payload).encode()
                self.items.append(Captured(f"mqtt:{message.topic.value}", raw))

    async def start_amqp(self, amqp_url: str, transport: Transport) -> None:
        """A tap queue bound ``#`` on the topic exchange every service publishes to."""
        self._amqp = await aio_pika.connect(amqp_url)
        channel = await self._amqp.channel()
        tap = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await tap.bind("jpki", "#")

        async def keep(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            self.items.append(Captured(f"amqp:{message.routing_key}", message.body))
            await message.ack()

        await tap.consume(keep)

    async def stop(self) -> None:
        await asyncio.sleep(0.5)  # let the last messages arrive
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task
        if self._amqp is not None:
            await self._amqp.close()


def _type_of(payload: bytes) -> str | None:
    try:
        return decode(payload).envelope.type
    except InvalidMessage:
        return None


@pytest.mark.rabbitmq
@pytest.mark.mqtt
@pytest.mark.postgres
@pytest.mark.slow
async def test_capture_no_pin_or_password_on_any_wire(
    tmp_path: Path, amqp_vhost_url: str, mqtt_url: str, pg_url: str, unique: str
) -> None:
    services = _services(amqp_vhost_url, mqtt_url, pg_url, unique)
    settings = RunSettings(phones=16, data_dir=tmp_path, seed=63, profile_mix=MIX,
                           certificate_mix=CERTIFICATES, pin_option_mix="4=1,3=1",
                           key_pool=24, device_prefix=f"c{unique}")
    capture = Capture(mqtt_url)
    people: dict[str, str] = {}

    def remember_secrets(fleet: Fleet) -> None:
        for phone in fleet.phones:
            for who, person in (("owner", phone.owner), ("previous", phone.previous_owner)):
                if person is None:
                    continue
                tag = f"{phone.device_id}/{who}"
                people[f"{tag}/auth_pin"] = person.auth_pin
                people[f"{tag}/signing_password"] = person.signing_password
                people[f"{tag}/card_password"] = person.card_password

    await capture.start_mqtt()
    try:
        outcome = await run_stack(
            settings, services, on_fleet=remember_secrets,
            on_transport=lambda transport: capture.start_amqp(amqp_vhost_url, transport),
        )
    finally:
        await capture.stop()
        await _drop_schemas(services, tmp_path)
    check_every_phone(outcome)
    root = services.topic_root.split("/")[0]
    ours = [c for c in capture.items if c.where.startswith(("amqp:", f"mqtt:{root}/"))]
    assert sum(c.where.startswith("mqtt:") for c in ours) > 100
    assert sum(c.where.startswith("amqp:") for c in ours) > 100

    # The TSM's scripts to the phone (AMQP device.* and the MQTT down topic) are the one
    # place temporary PINs may travel.
    temporary: dict[str, str] = {}
    allowed: list[Captured] = []
    for item in ours:
        message = None
        with contextlib.suppress(InvalidMessage):
            message = decode(item.payload)
        if message is None or message.envelope.type != "se.cmd.script":
            continue
        to_phone = item.where.startswith("amqp:device.") or item.where.endswith("/down")
        assert to_phone, f"a TSM script outside the TSM → app path: {item.where}"
        allowed.append(item)
        for pin in message.body.temporary_pins:
            temporary[f"{message.envelope.device_id}/{pin.kind.value}"] = pin.pin
    assert temporary, "no temporary PIN seen: the capture missed the TSM → app path"
    elsewhere = [c for c in ours if c not in allowed]

    # 1. the users' PINs and passwords: nowhere, in no encoding. A user's 4-digit PIN that
    # happens to equal a temporary PIN the TSM drew is the same bytes on the wire: it is
    # looked for everywhere but in those scripts.
    coincident = {label: value for label, value in people.items()
                  if value in temporary.values()}
    others = {label: value for label, value in people.items() if label not in coincident}
    leaks = scan(capture.items, others) + scan(elsewhere, coincident)
    assert leaks == [], [(h.secret_label, h.encoding, h.where, h.context) for h in leaks[:5]]

    # 2. temporary PINs: only in those scripts, never anywhere else
    leaks = scan(elsewhere, temporary)
    assert leaks == [], [(h.secret_label, h.encoding, h.where, h.context) for h in leaks[:5]]
    assert {_type_of(c.payload) for c in allowed} == {"se.cmd.script"}
