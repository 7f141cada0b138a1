"""The CA worker over a transport: inbox de-duplication, outbox replies, typed failures."""

from __future__ import annotations

import asyncio
import os

import pytest
from ca_support import (
    OTHER_SE,
    SE,
    SigningGate,
    application,
    card_sign,
    issue_card,
    key_request,
    verify,
)

from infra.db.outbox import outgoing
from infra.transport.inprocess import InProcessTransport
from protocol.envelope import build, decode
from workers.ca import messages as m
from workers.ca.errors import CaErrorCode
from workers.ca.profiles import CertType, Holder
from workers.ca.revocation import Cause, Status
from workers.ca.service import CaWorker
from workers.ca.state_check import Branch

REPLY_WAIT = 10.0


class Harness:
    """Publishes commands to the ``ca`` queue and collects replies as the orchestrator would."""

    def __init__(self, transport) -> None:
        self.transport = transport
        self.replies: asyncio.Queue = asyncio.Queue()

    async def start(self, queue: str = "orchestrator.test") -> None:
        await self.transport.declare_queue(queue, ["ca.reply.#"])

        async def collect(delivery) -> None:
            await self.replies.put(decode(delivery.body))
            await delivery.ack()

        self.subscription = await self.transport.consume(queue, collect)

    async def send(self, body, saga_id: str | None = "saga-1", message_id: str | None = None):
        message = build(body, saga_id=saga_id, message_id=message_id)
        await self.transport.publish([outgoing(message)])
        return message

    async def reply(self):
        return await asyncio.wait_for(self.replies.get(), REPLY_WAIT)


@pytest.fixture(params=["inprocess", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def running(request, ca, unique):
    if request.param == "rabbitmq":
        from infra.transport.rabbitmq import RabbitMQTransport

        # an exchange and queues of our own: other runs on the broker never see our commands
        transport = RabbitMQTransport(
            request.getfixturevalue("amqp_url"),
            exchange=f"jpki.test.{unique}",
            dead_letter_exchange=f"jpki.test.{unique}.dlx",
        )
        queues = (f"ca.test.{unique}", f"orchestrator.test.{unique}")
    else:
        transport = InProcessTransport()
        queues = ("ca", "orchestrator.test")
    await transport.connect()
    worker = CaWorker(ca, transport, queue=queues[0])
    harness = Harness(transport)
    await harness.start(queues[1])
    await worker.start()
    yield harness, worker
    await asyncio.sleep(0.2)  # see jpki/bench/ca.py WorkerPath.stop: a 3.11 wait_for race
    await worker.stop()
    await harness.subscription.cancel()
    if request.param == "rabbitmq":
        await transport.delete_topology()  # leave the shared broker as we found it
    await transport.close()


def verify_command(card, saga_id: str, nonce: bytes, *, se=SE, command_id: str = "verify-1"):
    app = application(saga_id, nonce, se=se)
    return m.VerifyApplication(
        command_id=command_id,
        se=SE,
        nonce=nonce,
        to_be_signed=app.to_be_signed(),
        signature=card_sign(card, app),
        card_certificate=card.certs.sign.der,
    )


def issue_command(saga_id: str, keys, command_id: str = "issue-1", pair=None):
    requests = pair or [
        key_request(saga_id, CertType.AUTH, keys()),
        key_request(saga_id, CertType.SIGN, keys()),
    ]
    return m.IssueCertificates(
        command_id=command_id,
        public_keys=[
            m.PublicKeyProof(
                kind=r.cert_type,
                public_key_der=r.public_key_der,
                challenge=r.challenge,
                proof=r.proof,
            )
            for r in requests
        ],
    ), requests


async def test_issuance_over_the_bus(running, ca, keys) -> None:
    harness, worker = running
    card = await issue_card(ca, keys)
    sent = await harness.send(verify_command(card, "saga-1", os.urandom(32)))
    reply = await harness.reply()
    assert reply.envelope.type == "ca.reply.verify_application"
    assert (
        reply.envelope.saga_id == "saga-1"
        and reply.envelope.causation_id == sent.envelope.message_id
    )
    assert reply.body.ok and reply.body.person_id == card.person.person_id
    assert reply.body.card_serial == card.certs.sign.serial

    await harness.send(m.StateCheckRequest(command_id="check-1"))
    check = (await harness.reply()).body
    assert check.ok and check.branch is Branch.NEW_ISSUANCE

    command, requests = issue_command("saga-1", keys)
    first = await harness.send(command)
    issued = (await harness.reply()).body
    assert issued.ok and [c.kind for c in issued.certificates] == [CertType.AUTH, CertType.SIGN]

    # the same message delivered again: the inbox answers nothing twice
    await harness.send(command, message_id=first.envelope.message_id)
    # the same command re-sent under a new message id: the same certificates
    again_command, _ = issue_command("saga-1", keys, command_id="issue-1", pair=requests)
    await harness.send(again_command)
    again = (await harness.reply()).body
    assert [c.certificate for c in again.certificates] == [
        c.certificate for c in issued.certificates
    ]
    assert harness.replies.empty()
    assert worker.consumer.duplicates == 1
    assert len(await ca.certificates(holder=Holder.PHONE)) == 2

    # life cycle: temporary loss, found, then a move cascades from the card
    await harness.send(m.Hold(command_id="hold-1", selection=m.Selection(se_cin=SE.cin)))
    held = (await harness.reply()).body
    assert {(c.kind, c.status, c.reason) for c in held.changes} == {
        (CertType.AUTH, Status.HELD, "certificate_hold"),
        (CertType.SIGN, Status.HELD, "certificate_hold"),
    }
    auth_serial = issued.certificates[0].serial
    await harness.send(
        m.Release(command_id="release-1", selection=m.Selection(serials=[auth_serial]))
    )
    released = (await harness.reply()).body
    assert [(c.serial, c.status) for c in released.changes] == [(auth_serial, Status.VALID)]
    await harness.send(
        m.CardCertificateRevoked(
            command_id="card-1", card_serial=card.certs.sign.serial, cause=Cause.CARD_FACTS_CHANGED
        )
    )
    cascade = (await harness.reply()).body
    assert {(c.holder, c.kind, c.reason) for c in cascade.changes} == {
        (Holder.CARD, CertType.SIGN, "affiliation_changed"),
        (Holder.PHONE, CertType.SIGN, "affiliation_changed"),
    }


async def test_refusals_are_typed_replies_and_change_nothing(running, ca, keys) -> None:
    harness, _ = running
    card = await issue_card(ca, keys)
    await harness.send(verify_command(card, "saga-1", os.urandom(32), se=OTHER_SE))
    refused = (await harness.reply()).body
    assert not refused.ok and refused.failure.code is CaErrorCode.WRONG_SECURE_ELEMENT
    assert not refused.failure.transient
    command, _ = issue_command("saga-1", keys)
    await harness.send(command)
    assert (await harness.reply()).body.failure.code is CaErrorCode.APPLICATION_NOT_VERIFIED

    # a release of a certificate not held is refused and its savepoint rolls back alone
    await harness.send(verify_command(card, "saga-2", nonce := os.urandom(32)), saga_id="saga-2")
    assert (await harness.reply()).body.ok
    command, _ = issue_command("saga-2", keys)
    await harness.send(command, saga_id="saga-2")
    issued = (await harness.reply()).body
    serials = [c.serial for c in issued.certificates]
    await harness.send(m.Release(command_id="release-x", selection=m.Selection(serials=serials)))
    assert (await harness.reply()).body.failure.code is CaErrorCode.INVALID_TRANSITION
    await harness.send(m.StateCheckRequest(command_id="check-x"), saga_id=None)
    assert (await harness.reply()).body.failure.code is CaErrorCode.INVALID_REQUEST
    assert all(r.status is Status.VALID for r in await ca.certificates(holder=Holder.PHONE))
    assert nonce  # consumed by saga-2 only


async def test_a_batch_keeps_the_order_of_effects(ca, keys) -> None:
    """Issues are signed together, but a later command still sees the certificates issued
    before it, a duplicate gets the first one's certificates, and refusals keep their place."""
    from workers.ca.service import CaService

    card = await issue_card(ca, keys)
    for saga in ("saga-1", "saga-2"):
        await verify(ca, card, saga, os.urandom(32))
    one, requests = issue_command("saga-1", keys, command_id="one")
    again, _ = issue_command("saga-1", keys, command_id="again", pair=requests)
    two, _ = issue_command("saga-2", keys, command_id="two")
    stray, _ = issue_command("saga-9", keys, command_id="stray")
    batch = [
        build(one, saga_id="saga-1"),
        build(stray, saga_id="saga-9"),
        build(again, saga_id="saga-1"),
        build(two, saga_id="saga-2"),
        build(m.Hold(command_id="hold", selection=m.Selection(se_cin=SE.cin)), saga_id="ops"),
    ]
    async with ca.database.transaction() as conn:
        out = await CaService(ca).handle_batch(conn, batch)
    replies = [decode(o.body).body for o in out]
    assert [r.command_id for r in replies] == ["one", "stray", "again", "two", "hold"]
    assert replies[1].failure.code is CaErrorCode.APPLICATION_NOT_VERIFIED
    assert [c.certificate for c in replies[2].certificates] == [
        c.certificate for c in replies[0].certificates
    ]
    held = {c.serial for c in replies[4].changes}
    assert held == {c.serial for c in replies[0].certificates} | {
        c.serial for c in replies[3].certificates
    }
    assert len(await ca.certificates(holder=Holder.PHONE)) == 4


async def test_se_certificates_lists_what_is_live_on_an_se(running, ca, keys) -> None:
    harness, _ = running
    card = await issue_card(ca, keys)
    await harness.send(verify_command(card, "saga-1", os.urandom(32)))
    assert (await harness.reply()).body.ok
    command, _ = issue_command("saga-1", keys)
    await harness.send(command)
    auth, sign = (await harness.reply()).body.certificates
    await ca.hold(auth.serial)
    await ca.revoke(sign.serial, Cause.LOSS)
    await harness.send(m.SeCertificatesQuery(command_id="live-1", se_cin=SE.cin), saga_id=None)
    live = (await harness.reply()).body
    assert [(c.serial, c.kind, c.status, c.person_id) for c in live.certificates] == [
        (auth.serial, CertType.AUTH, Status.HELD, card.person.person_id)
    ]
    await harness.send(
        m.SeCertificatesQuery(command_id="live-2", se_cin=OTHER_SE.cin), saga_id=None
    )
    assert (await harness.reply()).body.certificates == []


async def test_the_worker_signs_before_its_batch_transaction(running, ca, keys, monkeypatch):
    harness, _ = running
    card = await issue_card(ca, keys)
    await harness.send(verify_command(card, "saga-1", os.urandom(32)))
    assert (await harness.reply()).body.ok
    gate = SigningGate(monkeypatch)
    command, _ = issue_command("saga-1", keys)
    await harness.send(command)
    try:
        await gate.signing()
        async with asyncio.timeout(5):  # the store is free while the worker signs
            async with ca.database.transaction() as conn:
                await conn.exec_driver_sql("SELECT 1")
    finally:
        gate.open()
    issued = (await harness.reply()).body
    assert issued.ok and len(issued.certificates) == 2
    assert len(await ca.certificates(holder=Holder.PHONE)) == 2


async def test_presigned_issues_see_the_commands_before_them(ca, keys) -> None:
    """Signed ahead of the batch's transaction, each issuance is still checked in its place:
    a card revoked by an earlier command of the batch stops it, a duplicate answers the
    pair stored before it, and the certificates stored before a revocation are revoked."""
    from workers.ca.service import CaService

    card = await issue_card(ca, keys)
    for saga in ("saga-1", "saga-2"):
        await verify(ca, card, saga, os.urandom(32))
    one, requests = issue_command("saga-1", keys, command_id="one")
    again, _ = issue_command("saga-1", keys, command_id="again", pair=requests)
    two, _ = issue_command("saga-2", keys, command_id="two")
    revoke = m.CardCertificateRevoked(
        command_id="revoke", card_serial=card.certs.sign.serial, cause=Cause.CARD_FACTS_CHANGED
    )
    batch = [
        build(one, saga_id="saga-1"),
        build(again, saga_id="saga-1"),
        build(revoke, saga_id="ops"),
        build(two, saga_id="saga-2"),
    ]
    service = CaService(ca)
    await service.presign(batch)
    async with ca.database.transaction() as conn:
        out = await service.handle_batch(conn, batch)
    service.forget_presigned(batch)
    replies = [decode(o.body).body for o in out]
    assert [r.command_id for r in replies] == ["one", "again", "revoke", "two"]
    assert [c.certificate for c in replies[1].certificates] == [
        c.certificate for c in replies[0].certificates
    ]
    revoked = {c.serial for c in replies[2].changes}
    assert {c.serial for c in replies[0].certificates if c.kind is CertType.SIGN} <= revoked
    assert replies[3].failure.code is CaErrorCode.CARD_CERTIFICATE_REVOKED
    assert len(await ca.certificates(holder=Holder.PHONE)) == 2
