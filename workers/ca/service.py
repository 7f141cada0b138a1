"""The CA worker: consumes the ``ca`` queue, answers on ``ca.reply.<op>``.

Each batch of deliveries runs in one transaction with its inbox rows and outbox replies
(``infra.db.InboxConsumer``): a redelivered command is recognised and not run twice, and a
reply leaves only if the effect committed. Each command runs inside its own savepoint, so a
refused command (a ``CaError``: forged signature, revoked card, ...) rolls back only its own
work and is answered with a ``Failure`` (commands that refuse before their first write
skip the savepoint); a transient error (CA key unavailable) propagates
and the message is retried.

Issue commands are signed before the batch's transaction opens (``CaService.presign``: a
short read plans them, the signatures run with no transaction open), so the transaction
holds the store only for the checks and writes; inside it each issuance checks again what
the commands before it may have changed and stores its certificates, or answers those a
duplicate stored first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from infra.bus import SERVICE_QUEUES, declare_topology
from infra.db.inbox import InboxConsumer
from infra.db.outbox import OutboxRelay, outgoing
from infra.transport.base import Outgoing, Transport
from protocol.envelope import Message, build
from protocol.errors import Disposition
from workers.ca import messages as m
from workers.ca.authority import (
    CertificateAuthority,
    IssuedCertificate,
    IssuePlan,
    KeyRequest,
    StatusChange,
)
from workers.ca.errors import CaError, InvalidRequest
from workers.ca.profiles import Holder
from workers.ca.revocation import Cause, Status

log = structlog.get_logger("ca.service")

QUEUE = "ca"

Handler = Callable[[AsyncConnection, Message], Awaitable[m.CaReply]]


class CaService:
    """The message shell around a ``CertificateAuthority``."""

    def __init__(self, authority: CertificateAuthority) -> None:
        self.authority = authority
        # issue commands signed ahead of their batch's transaction, by message id
        self._presigned: dict[str, IssuePlan] = {}
        self._handlers: dict[type, tuple[Handler, type[m.CaReply]]] = {
            m.VerifyApplication: (self._verify, m.ApplicationVerified),
            m.StateCheckRequest: (self._state_check, m.StateCheckResult),
            m.IssueCertificates: (self._issue, m.CertificatesIssued),
            m.Hold: (self._hold, m.HoldDone),
            m.Release: (self._release, m.ReleaseDone),
            m.Revoke: (self._revoke, m.RevokeDone),
            m.CardCertificateRevoked: (self._card_cascade, m.CardCascadeDone),
            m.SeCertificatesQuery: (self._se_certificates, m.SeCertificates),
        }

    async def presign(self, messages: Sequence[Message]) -> None:
        """Plan the batch's issue commands in one short read and sign them with no
        transaction open; ``handle_batch`` then stores them. A command that refuses here is
        left to ``handle_batch``, which refuses it in its place in the batch (or, if the
        commands before it change the answer, answers as they make it); a saga's second
        command in the batch is left too: it finds the first one's certificates."""
        first_of_saga: dict[str, Message] = {}
        for message in messages:
            if isinstance(message.body, m.IssueCertificates) and message.envelope.saga_id:
                first_of_saga.setdefault(message.envelope.saga_id, message)
        if not first_of_saga:
            return
        async with self.authority.database.transaction() as conn:
            outcomes = await self.authority.plan_issues(
                conn,
                [
                    (saga_id, _key_requests(message.body))
                    for saga_id, message in first_of_saga.items()
                ],
            )
        plans = {
            message.envelope.message_id: outcome
            for message, outcome in zip(first_of_saga.values(), outcomes, strict=True)
            if isinstance(outcome, IssuePlan) and outcome.to_sign
        }
        await self.authority.sign_issue(list(plans.values()))
        self._presigned.update(plans)

    def forget_presigned(self, messages: Sequence[Message]) -> None:
        """Drop what ``presign`` left for ``messages`` (their batch is over: stored, or
        failed and retried, or duplicates the inbox turned away): never issued."""
        for message in messages:
            self._presigned.pop(message.envelope.message_id, None)

    @contextlib.asynccontextmanager
    async def presigned(self, messages: list[Message]) -> AsyncIterator[None]:
        """Around the inbox's batch transaction: sign before it opens, forget after."""
        await self.presign(messages)
        try:
            yield
        finally:
            self.forget_presigned(messages)

    async def handle_batch(
        self, conn: AsyncConnection, messages: list[Message]
    ) -> Sequence[Outgoing]:
        """Answer a batch in order. A run of consecutive issue commands of distinct sagas
        is planned one by one (unless ``presign`` did), signed together, then checked again
        and stored together; any other command, or a second command of a saga in the run,
        ends the run first, so every command still sees the effects of those before it."""
        replies: list[Outgoing | None] = []
        run: list[tuple[int, Message, IssuePlan]] = []
        for message in messages:
            if not isinstance(message.body, m.IssueCertificates):
                await self._finish_run(conn, run, replies)
                replies.append(await self.handle(conn, message))
                continue
            if any(plan.saga_id == message.envelope.saga_id for _, _, plan in run):
                await self._finish_run(conn, run, replies)  # a duplicate sees the first's work
            plan = self._presigned.pop(message.envelope.message_id, None)
            if plan is None:
                try:
                    plan = await self.authority.plan_issue(
                        conn, self._saga(message), _key_requests(message.body)
                    )
                except CaError as exc:
                    replies.append(self._refusal(message, m.CertificatesIssued, exc))
                    continue
            replies.append(None)  # filled when the run is finished
            run.append((len(replies) - 1, message, plan))
        await self._finish_run(conn, run, replies)
        return [reply for reply in replies if reply is not None]

    async def _finish_run(
        self,
        conn: AsyncConnection,
        run: list[tuple[int, Message, IssuePlan]],
        replies: list[Outgoing | None],
    ) -> None:
        if not run:
            return
        plans = [plan for _, _, plan in run]
        await self.authority.sign_issue(plans)
        outcomes = await self.authority.store_issues(conn, plans)
        for (index, message, _), outcome in zip(run, outcomes, strict=True):
            if isinstance(outcome, CaError):
                replies[index] = self._refusal(message, m.CertificatesIssued, outcome)
            else:
                replies[index] = self._reply(message, _issued_body(message.body, outcome))
        run.clear()

    async def handle(self, conn: AsyncConnection, message: Message) -> Outgoing | None:
        """Answer one command (``None`` for a message that is not a CA command)."""
        entry = self._handlers.get(type(message.body))
        if entry is None:
            log.warning("ca.unexpected_message", message_type=message.envelope.type)
            return None
        handler, reply_type = entry
        try:
            if self._checks_before_writing(message.body):
                body = await handler(conn, message)
            else:
                async with conn.begin_nested():
                    body = await handler(conn, message)
        except CaError as exc:
            return self._refusal(message, reply_type, exc)
        return self._reply(message, body)

    def _refusal(self, message: Message, reply_type: type[m.CaReply], exc: CaError) -> Outgoing:
        if exc.disposition is Disposition.TRANSIENT:
            raise exc
        log.info("ca.refused", message_type=message.envelope.type, code=exc.code.value)
        body = reply_type(
            command_id=message.body.command_id, failure=m.Failure(code=exc.code, detail=str(exc))
        )
        return self._reply(message, body)

    @staticmethod
    def _reply(message: Message, body: m.CaReply) -> Outgoing:
        reply = build(
            body,
            saga_id=message.envelope.saga_id,
            device_id=message.envelope.device_id,
            causation_id=message.envelope.message_id,
        )
        return outgoing(reply, routing_key=message.envelope.reply_to)

    @staticmethod
    def _checks_before_writing(body: object) -> bool:
        """Commands whose every refusal is raised before their first write need no savepoint
        (two statements saved on the hot path); changing several named certificates may
        refuse the second after changing the first, so it runs inside one."""
        selection = getattr(body, "selection", None)
        return selection is None or len(selection.serials) <= 1

    # ------------------------------------------------------------------ handlers

    @staticmethod
    def _saga(message: Message) -> str:
        saga_id = message.envelope.saga_id
        if not saga_id:
            raise InvalidRequest("this command belongs to a saga: the envelope names none")
        return saga_id

    async def _verify(self, conn: AsyncConnection, message: Message) -> m.CaReply:
        body: m.VerifyApplication = message.body
        verified = await self.authority.verify_application(
            saga_id=self._saga(message),
            expected_nonce=body.nonce,
            expected_se=body.se,
            to_be_signed=body.to_be_signed,
            signature=body.signature,
            card_certificate=body.card_certificate,
            conn=conn,
        )
        return m.ApplicationVerified(
            command_id=body.command_id,
            person_id=verified.person_id,
            card_serial=verified.card_serial,
            certificates=list(verified.certificates),
            pin_option=verified.pin_option,
        )

    async def _state_check(self, conn: AsyncConnection, message: Message) -> m.CaReply:
        check = await self.authority.state_check(self._saga(message), conn=conn)
        return m.StateCheckResult(
            command_id=message.body.command_id,
            branch=check.branch,
            revoke_now=list(check.revoke_now),
            release=list(check.release),
            revoke_after_success=list(check.revoke_after_success),
            old_se=list(check.old_se),
        )

    async def _issue(self, conn: AsyncConnection, message: Message) -> m.CaReply:
        body: m.IssueCertificates = message.body
        issued = await self.authority.issue(self._saga(message), _key_requests(body), conn=conn)
        return _issued_body(body, issued)

    async def _select(
        self, conn: AsyncConnection, selection: m.Selection, target: Status, cause: Any
    ) -> list[StatusChange]:
        if selection.serials:
            changes: list[StatusChange] = []
            for serial in selection.serials:
                changes += await self.authority.change_status(serial, target, cause, conn=conn)
            return changes
        return await self.authority.change_status_of(
            target,
            cause,
            se_cin=selection.se_cin,
            person_id=selection.person_id,
            cert_types=selection.kinds,
            conn=conn,
        )

    async def _hold(self, conn: AsyncConnection, message: Message) -> m.CaReply:
        body: m.Hold = message.body
        changes = await self._select(conn, body.selection, Status.HELD, Cause.TEMPORARY_LOSS)
        return m.HoldDone(command_id=body.command_id, changes=_changes(changes))

    async def _release(self, conn: AsyncConnection, message: Message) -> m.CaReply:
        body: m.Release = message.body
        changes = await self._select(conn, body.selection, Status.VALID, Cause.FOUND)
        return m.ReleaseDone(command_id=body.command_id, changes=_changes(changes))

    async def _revoke(self, conn: AsyncConnection, message: Message) -> m.CaReply:
        body: m.Revoke = message.body
        changes = await self._select(conn, body.selection, Status.REVOKED, body.cause)
        return m.RevokeDone(command_id=body.command_id, changes=_changes(changes))

    async def _card_cascade(self, conn: AsyncConnection, message: Message) -> m.CaReply:
        body: m.CardCertificateRevoked = message.body
        record = await self.authority.certificate(body.card_serial, conn=conn)
        if record.holder is not Holder.CARD:
            raise InvalidRequest("the cascade starts from a card certificate")
        changes = await self.authority.revoke(body.card_serial, body.cause, conn=conn)
        return m.CardCascadeDone(command_id=body.command_id, changes=_changes(changes))

    async def _se_certificates(self, conn: AsyncConnection, message: Message) -> m.CaReply:
        body: m.SeCertificatesQuery = message.body
        records = await self.authority.live_phone_certificates(body.se_cin, conn=conn)
        return m.SeCertificates(
            command_id=body.command_id,
            certificates=[
                m.LiveCertificate(
                    serial=r.serial,
                    kind=r.cert_type,
                    person_id=r.person_id,
                    status=r.status,
                    certificate=r.der,
                )
                for r in records
            ],
        )


def _key_requests(body: m.IssueCertificates) -> list[KeyRequest]:
    return [
        KeyRequest(
            cert_type=key.kind,
            public_key_der=key.public_key_der,
            challenge=key.challenge,
            proof=key.proof,
        )
        for key in body.public_keys
    ]


def _issued_body(body: m.IssueCertificates, issued: list[IssuedCertificate]) -> m.CaReply:
    return m.CertificatesIssued(
        command_id=body.command_id,
        certificates=[
            m.Certificate(
                kind=c.cert_type,
                serial=c.serial,
                certificate=c.der,
                ca_certificate=c.ca_der,
                not_after=c.not_after,
            )
            for c in issued
        ],
    )


def _changes(changes: list[StatusChange]) -> list[m.StatusChange]:
    return [
        m.StatusChange(
            serial=c.serial,
            kind=c.cert_type,
            holder=c.holder,
            status=c.status,
            reason=c.reason,
            changed=c.changed,
        )
        for c in changes
    ]


class CaWorker:
    """The running worker: queue declared, inbox consumer and outbox relay started."""

    def __init__(
        self, authority: CertificateAuthority, transport: Transport, *, queue: str = QUEUE
    ) -> None:
        self.service = CaService(authority)
        self._transport = transport
        self._queue = queue
        self.relay = OutboxRelay(authority.database, transport, name=queue)
        self.consumer = InboxConsumer(
            authority.database,
            transport,
            queue,
            self.service.handle_batch,
            relay=self.relay,
            around_batch=self.service.presigned,
        )

    async def start(self) -> None:
        await declare_topology(self._transport, {self._queue: SERVICE_QUEUES[QUEUE]}, gateway=False)
        await self.relay.start()
        await self.consumer.start()
        log.info("ca.worker_started", queue=self._queue)

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.relay.stop()


async def run_until_cancelled(worker: CaWorker) -> None:
    await worker.start()
    try:
        await asyncio.Event().wait()
    finally:
        await worker.stop()
