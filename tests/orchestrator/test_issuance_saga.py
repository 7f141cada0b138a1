"""The new-issuance saga's logic on the in-memory tier (STYLE §11): the real orchestrator and
engine on the in-process transport and SQLite, with the TSM, the CA and the phone played by
scripted participants, so that every branch and compensation of FLOWS.md §1/§3 is forced on
purpose. The real participants run the same flow in ``tests/e2e``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from infra.bus import GATEWAY_QUEUE, SERVICE_QUEUES, declare_topology
from infra.db import Database
from infra.db.outbox import outgoing
from infra.transport.base import Delivery
from infra.transport.inprocess import InProcessTransport
from orchestrator import messages as om
from orchestrator.flows import issuance as issuance_flow
from orchestrator.flows.issuance import IssuanceData
from orchestrator.saga.machine import TERMINAL
from orchestrator.service import Orchestrator
from protocol.envelope import Message, build, decode
from workers.ca import messages as ca
from workers.ca.errors import CaErrorCode
from workers.ca.profiles import CertType
from workers.ca.state_check import Branch
from workers.tsm import messages as tsm

SE = om.SeIdentity(cin="0A0B0C0D0E0F10111213", kdd="0A0B0C0D0E0F10111213")
PERSON = "person-1"

Answer = Callable[[Any], Any]


def _default_answers() -> dict[type, Answer]:
    def keys(cmd: tsm.GenerateKeys) -> tsm.GenerateKeysReply:
        return tsm.GenerateKeysReply(
            command_id=cmd.command_id,
            public_keys=[tsm.PublicKey(kind=k, public_key_der=b"spki-" + k.value.encode(),
                                       challenge=b"c" * 32, proof=b"p") for k in cmd.certificates],
        )

    def issue(cmd: ca.IssueCertificates) -> ca.CertificatesIssued:
        from datetime import UTC, datetime

        return ca.CertificatesIssued(
            command_id=cmd.command_id,
            certificates=[ca.Certificate(kind=k.kind, serial=f"{i + 1:02X}",
                                         certificate=b"cert", ca_certificate=b"ca",
                                         not_after=datetime(2030, 1, 1, tzinfo=UTC))
                          for i, k in enumerate(cmd.public_keys)],
        )

    return {
        tsm.PrepareSe: lambda c: tsm.PrepareSeReply(command_id=c.command_id, installed=True),
        tsm.GenerateKeys: keys,
        tsm.StoreCertificates: lambda c: tsm.StoreCertificatesReply(
            command_id=c.command_id, stored=[x.kind for x in c.certificates]),
        tsm.ReleasePins: lambda c: tsm.ReleasePinsReply(
            command_id=c.command_id, released=c.certificates, pins_delivered=True),
        tsm.WipeApplet: lambda c: tsm.WipeAppletReply(command_id=c.command_id, wiped=True,
                                                      deleted=c.delete_applet),
        ca.VerifyApplication: lambda c: ca.ApplicationVerified(
            command_id=c.command_id, person_id=PERSON, card_serial="AA"),
        ca.StateCheckRequest: lambda c: ca.StateCheckResult(
            command_id=c.command_id, branch=Branch.NEW_ISSUANCE),
        ca.IssueCertificates: issue,
        ca.Revoke: lambda c: ca.RevokeDone(command_id=c.command_id),
    }


@dataclass
class World:
    transport: InProcessTransport
    orchestrator: Orchestrator
    answers: dict[type, Answer] = field(default_factory=_default_answers)
    commands: list[Any] = field(default_factory=list)  # every TSM/CA command, in order
    to_phone: list[Message] = field(default_factory=list)
    phone_answers: bool = True
    abort_on_card_request: bool = False

    async def on_command(self, delivery: Delivery) -> None:
        message = decode(delivery.body)
        self.commands.append(message.body)
        reply = self.answers[type(message.body)](message.body)
        if reply is not None:
            out = build(reply, saga_id=message.envelope.saga_id,
                        causation_id=message.envelope.message_id)
            await self.transport.publish([outgoing(out)])
        await delivery.ack()

    async def on_phone(self, delivery: Delivery) -> None:
        message = decode(delivery.body)
        self.to_phone.append(message)
        body, saga_id = message.body, message.envelope.saga_id
        answer: Any = None
        if isinstance(body, om.CardSignatureRequest) and self.phone_answers:
            if self.abort_on_card_request:
                answer = om.Aborted(stage=om.AbortStage.CARD_SIGNATURE,
                                    reason=om.Reason.USER_CANCELLED)
            else:
                answer = om.CardSignature(nonce=body.application.nonce, signature=b"s",
                                          card_certificate=b"c")
        elif isinstance(body, om.PinSettingGoAhead) and self.phone_answers:
            answer = om.PinsSet(certificates=body.certificates)
        if answer is not None:
            up = build(answer, saga_id=saga_id, device_id="phone-1")
            await self.transport.publish([outgoing(up)])
        await delivery.ack()

    def kinds(self) -> list[str]:
        return [type(c).__name__ for c in self.commands]

    def results(self) -> list[om.Result]:
        return [m.body for m in self.to_phone if isinstance(m.body, om.Result)]


@pytest.fixture
async def world(tmp_path):
    transport = InProcessTransport()
    await transport.connect()
    await declare_topology(transport, SERVICE_QUEUES)
    db = Database.for_service("orchestrator", data_dir=tmp_path)
    orchestrator = Orchestrator(db, transport)
    w = World(transport, orchestrator)
    await orchestrator.start()
    subs = [
        await transport.consume("tsm", w.on_command),
        await transport.consume("ca", w.on_command),
        await transport.consume(GATEWAY_QUEUE, w.on_phone),
    ]
    yield w
    for sub in subs:
        await sub.cancel()
    await orchestrator.stop()
    await transport.close()
    await db.close()


def enrolment(model: str = "Pixel 9", certificates=("auth", "sign"), se=SE) -> om.Enrolment:
    return om.Enrolment(
        application_id=uuid.uuid4().hex, device_id="phone-1", app_instance_id=uuid.uuid4().hex,
        model=model, os_name="Android", os_version="15", se_present=se is not None, se=se,
        certificates=[om.CertificateKind(c) for c in certificates],
    )


async def run_saga(world: World, e: om.Enrolment, within: float = 10.0) -> Any:
    await world.transport.publish([outgoing(build(e, saga_id=e.application_id,
                                                  device_id=e.device_id))])
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        try:
            view = await world.orchestrator.engine.get(e.application_id)
        except Exception:  # not started yet
            view = None
        if view is not None and view.status in TERMINAL and world.results():
            return view
        await asyncio.sleep(0.02)
    raise AssertionError(f"saga did not end: {view}")


async def test_new_phone_reaches_phase_4(world: World) -> None:
    view = await run_saga(world, enrolment())
    assert view.status == "completed"
    assert world.kinds() == [
        "PrepareSe", "VerifyApplication", "StateCheckRequest", "GenerateKeys",
        "IssueCertificates", "StoreCertificates", "ReleasePins",
    ]
    [result] = world.results()
    assert (result.outcome, result.phase, result.model_change) == (om.Outcome.ISSUED, 4, False)
    assert sorted(result.certificates) == ["auth", "sign"]
    data: IssuanceData = view.data
    assert [c.serial for c in data.issued] == ["01", "02"]
    # the card signs exactly the application the orchestrator asked for
    request = next(m.body for m in world.to_phone if isinstance(m.body, om.CardSignatureRequest))
    verify = next(c for c in world.commands if isinstance(c, ca.VerifyApplication))
    assert verify.to_be_signed == request.application.to_be_signed()
    assert verify.nonce == request.application.nonce and len(verify.nonce) == 32


async def test_one_certificate_only(world: World) -> None:
    view = await run_saga(world, enrolment(certificates=("sign",)))
    assert view.status == "completed"
    generate = next(c for c in world.commands if isinstance(c, tsm.GenerateKeys))
    assert generate.certificates == [om.CertificateKind.SIGN]
    assert world.results()[0].certificates == [om.CertificateKind.SIGN]


@pytest.mark.parametrize(
    ("model", "se", "reason"),
    [
        ("Feature Flip 2", SE, om.Reason.UNSUPPORTED_MODEL),
        ("Pixel 9", None, om.Reason.NO_SECURE_ELEMENT),
    ],
)
async def test_unsupported_phone_is_refused_with_a_clear_reason(world, model, se, reason) -> None:
    view = await run_saga(world, enrolment(model=model, se=se))
    assert view.status == "compensated"
    assert world.commands == []  # nothing was asked of the TSM or the CA
    [result] = world.results()
    assert (result.outcome, result.reason, result.phase) == (om.Outcome.REFUSED, reason, 1)


async def test_second_hand_phone_applet_deleted_and_strangers_certificates_revoked(world) -> None:
    world.answers[tsm.PrepareSe] = lambda c: tsm.PrepareSeReply(
        command_id=c.command_id, applet_was_present=True, deleted=True, held_keys=True,
        owner_reference="stranger", installed=True)
    view = await run_saga(world, enrolment())
    assert view.status == "completed"
    kinds = world.kinds()
    revokes = [c for c in world.commands if isinstance(c, ca.Revoke)]
    assert [(r.cause.value, r.selection.se_cin) for r in revokes] == [("foreign_applet", SE.cin)]
    # only after the card proved who applies
    assert kinds.index("Revoke") > kinds.index("VerifyApplication")


async def test_reinstalled_app_own_applet_deleted_and_old_certificates_revoked(world) -> None:
    world.answers[tsm.PrepareSe] = lambda c: tsm.PrepareSeReply(
        command_id=c.command_id, applet_was_present=True, deleted=True, held_keys=True,
        owner_reference=PERSON, installed=True)
    world.answers[ca.StateCheckRequest] = lambda c: ca.StateCheckResult(
        command_id=c.command_id, branch=Branch.REISSUE_SAME_SE, revoke_now=["0A", "0B"])
    view = await run_saga(world, enrolment())
    assert view.status == "completed"
    [revoke] = [c for c in world.commands if isinstance(c, ca.Revoke)]
    assert (revoke.cause.value, revoke.selection.serials) == ("reissue", ["0A", "0B"])


async def test_model_change_revokes_the_old_phone_after_success(world) -> None:
    world.answers[ca.StateCheckRequest] = lambda c: ca.StateCheckResult(
        command_id=c.command_id, branch=Branch.MODEL_CHANGE, revoke_after_success=["0C"],
        old_se=["99887766554433221100"])
    view = await run_saga(world, enrolment())
    assert view.status == "completed"
    assert world.kinds()[-1] == "Revoke"  # after the PINs were set: phase 4 first
    revoke = world.commands[-1]
    assert (revoke.cause.value, revoke.selection.serials) == ("model_change", ["0C"])
    assert world.results()[0].model_change is True
    assert view.data.old_se == ["99887766554433221100"]  # its applet goes when next online


async def test_bad_card_signature_issues_nothing_and_removes_the_applet(world) -> None:
    world.answers[ca.VerifyApplication] = lambda c: ca.ApplicationVerified(
        command_id=c.command_id, failure=ca.Failure(code=CaErrorCode.FORGED_SIGNATURE))
    view = await run_saga(world, enrolment())
    assert view.status == "compensated"
    assert "IssueCertificates" not in world.kinds() and "GenerateKeys" not in world.kinds()
    wipe = world.commands[-1]
    assert isinstance(wipe, tsm.WipeApplet) and wipe.delete_applet
    [result] = world.results()
    assert (result.outcome, result.reason) == (om.Outcome.REFUSED, om.Reason.BAD_CARD_SIGNATURE)


async def test_store_failure_compensates_in_reverse_revoke_wipe_delete(world) -> None:
    world.answers[tsm.StoreCertificates] = lambda c: tsm.StoreCertificatesReply(
        command_id=c.command_id, failure=tsm.Failure(code=tsm.ErrorCode.CARD_ERROR))
    view = await run_saga(world, enrolment())
    assert view.status == "compensated"
    tail = world.commands[world.kinds().index("StoreCertificates") + 1:]
    assert [type(c).__name__ for c in tail] == ["Revoke", "WipeApplet", "WipeApplet"]
    revoke, wipe_keys, delete = tail
    assert revoke.cause.value == "compensation" and revoke.selection.se_cin == SE.cin
    assert revoke.selection.kinds == [CertType.AUTH, CertType.SIGN]
    assert (wipe_keys.delete_applet, delete.delete_applet) == (False, True)
    [result] = world.results()
    assert (result.outcome, result.reason, result.phase) == (
        om.Outcome.FAILED, om.Reason.SE_ERROR, 1)


async def test_prepare_failure_tells_the_phone_its_se_failed(world) -> None:
    world.answers[tsm.PrepareSe] = lambda c: tsm.PrepareSeReply(
        command_id=c.command_id, failure=tsm.Failure(code=tsm.ErrorCode.CARD_ERROR))
    view = await run_saga(world, enrolment())
    assert view.status == "compensated"
    assert "VerifyApplication" not in world.kinds()
    [result] = world.results()
    assert (result.outcome, result.reason, result.phase) == (
        om.Outcome.FAILED, om.Reason.SE_ERROR, 1)


def test_every_step_named_for_a_reason_is_a_step_of_the_flow() -> None:
    steps = {step.name for step in issuance_flow.issuance.steps}
    assert set(issuance_flow._STEP_REASONS) <= steps
    assert issuance_flow._REFUSING_STEPS <= steps


async def test_user_cancel_at_card_signature_removes_the_applet(world) -> None:
    world.abort_on_card_request = True
    view = await run_saga(world, enrolment())
    assert view.status == "compensated"
    assert world.kinds()[-1] == "WipeApplet" and "VerifyApplication" not in world.kinds()
    assert world.results()[0].outcome is om.Outcome.CANCELLED


async def test_redelivered_enrolment_starts_one_saga(world) -> None:
    e = enrolment()
    message = build(e, saga_id=e.application_id, device_id=e.device_id)
    await world.transport.publish([outgoing(message)])
    view = await run_saga(world, e)  # publishes it again
    assert view.status == "completed"
    assert world.kinds().count("PrepareSe") == 1
    assert len(world.results()) == 1


async def test_transient_tsm_failure_is_retried_not_compensated(world) -> None:
    calls = {"n": 0}

    def flaky_prepare(c: tsm.PrepareSe) -> tsm.PrepareSeReply:
        calls["n"] += 1
        if calls["n"] == 1:
            return tsm.PrepareSeReply(
                command_id=c.command_id,
                failure=tsm.Failure(code=tsm.ErrorCode.PHONE_UNREACHABLE))
        return tsm.PrepareSeReply(command_id=c.command_id, installed=True)

    world.answers[tsm.PrepareSe] = flaky_prepare
    view = await run_saga(world, enrolment())
    assert view.status == "completed"
    assert world.kinds().count("PrepareSe") == 2
    assert "WipeApplet" not in world.kinds()
