"""The SP-TSM's secure-channel handler: one asyncio task per operation, thousands at once.

``TsmEngine.execute(command)`` runs one orchestrator command against one SE: it looks the
SE up in the registry, builds the operation's script (``scripts.py``), sends it through a
``PhoneLink`` and verifies every answer. With the pseudo-random card challenge that is one
round trip; with a random challenge two; a drifted sequence counter costs one more (the
INITIALIZE UPDATE answer tells the real counter, the script is computed again).

Sessions of one SE run one at a time (a lock per SE: they share its counter); sessions of
different SEs run concurrently, so the phone link's latency overlaps.

Idempotency: a command id already answered gets the stored reply. A command cut off
mid-script is run again from the start: every script is safe to re-run.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import msgspec
import structlog
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from device_sim.se.element import ScriptCommand, SecureElement
from orchestrator.messages import CertificateKind
from protocol import jpki
from protocol.apdu import ResponseAPDU
from protocol.errors import (
    CryptogramMismatch,
    Disposition,
    JpkiError,
    SecureChannelError,
    SequenceCounterMismatch,
)
from protocol.scp03.keys import StaticKeys
from workers.tsm import messages as m
from workers.tsm import scripts as s
from workers.tsm.keys import MasterKeyRing
from workers.tsm.registry import (
    AppletState,
    ChallengeMode,
    Registry,
    SeRecord,
)

log = structlog.get_logger(__name__)

Random = Callable[[int], bytes]
DEFAULT_ATTEMPTS = 3  # per operation: the first try and up to two counter re-syncs
_PIN_SEAL_INFO = b"jpki-tsm/temporary-pin-seal/v1"
_STATE_SEAL_INFO = b"jpki-tsm/operation-state/v1"


class PhoneUnreachable(JpkiError):
    """The phone did not answer the script in time (or is not connected)."""

    disposition = Disposition.TRANSIENT


class NotPseudoRandom(SecureChannelError):
    """The SE answered INITIALIZE UPDATE with a random card challenge."""


class PhoneLink(Protocol):
    """Delivers a script to a phone and returns what its SE answered."""

    async def exchange(self, device_id: str, script: m.SeScript) -> m.SeScriptResult: ...


class InProcessPhoneLink:
    """Phones in this process (tests, benchmarks), optionally behind a simulated delay.

    ``latency`` is the round-trip time: half of it before the SE runs the script, half
    after. ``on_temporary_pins`` stands for the phone's app receiving the PINs meant for it.
    """

    def __init__(
        self,
        latency: float = 0.0,
        on_temporary_pins: Callable[[str, list[m.TemporaryPin]], None] | None = None,
    ) -> None:
        self.latency = latency
        self.elements: dict[str, SecureElement] = {}
        self.round_trips = 0
        self.se_cpu_seconds = 0.0  # CPU the simulated SEs spent running scripts
        self.scripts: list[tuple[str, m.SeScript]] = []  # kept only when ``record`` is set
        self.record = False
        self._on_temporary_pins = on_temporary_pins

    def attach(self, device_id: str, element: SecureElement) -> None:
        self.elements[device_id] = element

    async def exchange(self, device_id: str, script: m.SeScript) -> m.SeScriptResult:
        element = self.elements.get(device_id)
        if element is None:
            raise PhoneUnreachable("no such phone on this link")
        if self.latency:
            await asyncio.sleep(self.latency / 2)
        self.round_trips += 1
        if self.record:
            self.scripts.append((device_id, script))
        started = time.process_time()
        outcome = element.run_script(
            ScriptCommand(step.apdu, tuple(step.expect)) for step in script.steps
        )
        self.se_cpu_seconds += time.process_time() - started
        if script.temporary_pins and outcome.completed and self._on_temporary_pins:
            self._on_temporary_pins(device_id, list(script.temporary_pins))
        if self.latency:
            await asyncio.sleep(self.latency / 2)
        return m.SeScriptResult(
            script_id=script.script_id,
            responses=list(outcome.responses),
            completed=outcome.completed,
        )


class OperationFailed(JpkiError):
    """An operation ended with a failure the reply reports (code and safe detail)."""

    def __init__(self, code: m.ErrorCode, detail: str, sw: int | None = None) -> None:
        super().__init__(f"{code.value}: {detail}")
        self.failure = m.Failure(code=code, detail=detail, status_word=sw)
        if code in m.TRANSIENT_ERRORS:
            self.disposition = Disposition.TRANSIENT


class OperationContext(msgspec.Struct, frozen=True, kw_only=True):
    """Where the command came from: what the reply and the scripts carry."""

    saga_id: str | None = None
    device_id: str | None = None
    causation_id: str | None = None  # the command's message id


class Finished(msgspec.Struct, frozen=True):
    reply: m.TsmReply
    context: OperationContext


class Waiting(msgspec.Struct, frozen=True):
    """The operation waits for the phone's answer to ``script``."""

    device_id: str
    script: m.SeScript
    context: OperationContext


Step = Finished | Waiting


class _OperationState(msgspec.Struct, kw_only=True):
    """An operation between two scripts: all a replica needs to go on (sealed at rest)."""

    command: bytes = b""
    context: OperationContext
    snapshot: bytes = b""  # the SE's record when the operation began
    tape: bytes = b""  # the random bytes drawn so far (host challenges, PINs, script ids)
    results: list[m.SeScriptResult | None] = msgspec.field(default_factory=list)


@dataclass(slots=True)
class _Replay:
    """An operation run again from its start with the same inputs: the same random bytes
    and the phone's answers so far, so that it computes the same scripts and goes on
    from the first answer it does not have yet."""

    context: OperationContext
    snapshot: bytes | None = None
    tape: bytearray = field(default_factory=bytearray)
    results: list[m.SeScriptResult | None] = field(default_factory=list)
    position: int = 0
    exchanges: int = 0


class _Suspend(Exception):  # noqa: N818 - control flow, not an error
    def __init__(self, device_id: str, script: m.SeScript) -> None:
        super().__init__("waiting for the phone")
        self.device_id = device_id
        self.script = script


_replay: contextvars.ContextVar[_Replay | None] = contextvars.ContextVar("tsm_replay",
                                                                         default=None)
_reply_encoder = msgspec.json.Encoder()
_record_encoder = msgspec.json.Encoder()
_state_encoder = msgspec.msgpack.Encoder()
_state_decoder = msgspec.msgpack.Decoder(_OperationState)


class TsmEngine:
    def __init__(
        self,
        keys: MasterKeyRing,
        registry: Registry,
        link: PhoneLink | None,
        *,
        security_level: int = s.DEFAULT_SECURITY_LEVEL,
        random: Random = os.urandom,
        clock: Callable[[], float] = time.time,
        attempts: int = DEFAULT_ATTEMPTS,
        se_key_cache: int = 100_000,
    ) -> None:
        self.keys = keys
        self.registry = registry
        self.link = link
        self.security_level = security_level
        self._random = random
        self._clock = clock
        self._attempts = attempts
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # Diversified keys per (KVN, KDD): derived once per SE, as an HSM session would keep
        # them; bounded so that a fleet of millions does not pin them all in memory.
        self._se_keys: OrderedDict[tuple[int, str], StaticKeys] = OrderedDict()
        self._se_keys_max = se_key_cache
        self._seal_keys: dict[int, AESGCM] = {}
        self._state_keys: dict[int, AESGCM] = {}

    # ------------------------------------------------------------------ entry point

    async def execute(self, command: m.TsmCommand) -> m.TsmReply:
        """Run ``command`` to its end over the phone link; a command id seen before gets its
        stored reply.

        Three registry transactions per one-round-trip operation: look up (and mark
        running), the spent counter written before the script leaves, and the outcome with
        the reply at the end.
        """
        step = await self._run(command, None)
        assert isinstance(step, Finished)  # without a replay the link answers every script
        return step.reply

    async def start(
        self, command: m.TsmCommand, context: OperationContext, *,
        registry: Registry | None = None,
    ) -> Step:
        """Begin ``command`` without waiting for the phone (the service on the bus).

        Runs until the operation needs the phone's answer: the operation — the command,
        the SE's record as it was, the random bytes drawn so far, sealed — is stored with
        the id of the script it waits for (one registry transaction with the operation's
        record and the SE's), and the script is returned to be sent. Any replica then
        resumes it when ``se.result`` arrives (``resume``).

        ``registry``: a unit of the registry to join (a batch's transaction) instead of a
        unit of its own.
        """
        return await self._run(command, _Replay(context=context), registry)

    async def resume(
        self, result: m.SeScriptResult | None, script_id: str, *,
        registry: Registry | None = None,
    ) -> Step | None:
        """Go on with the operation waiting for ``script_id``; ``result`` None means the
        phone did not answer in time. None if no operation waits for that script (a late
        or repeated answer).

        One registry transaction: the look-up by script id and what the operation stores
        next (its outcome, or its next script). The SE's lock is only taken inside that
        transaction when it is free, without waiting: a task holding it may be waiting for
        the database, so waiting for it here could deadlock. When it is busy the look-up's
        transaction ends and the operation goes on like a command, lock first. A caller
        passing ``registry`` (a batch's unit, which this cannot end) must be the one task
        running operations, as the bus worker is: then no lock is ever busy.
        """
        async with (registry or self.registry).unit() as unit:
            waiting = await unit.waiting_for(script_id)
            if waiting is None:
                return None
            if waiting.status == "done" and waiting.reply is not None:
                # The reply may not have left before a crash: the caller publishes it again.
                context = self._unseal_state(waiting.state).context if waiting.state else None
                reply_type = _REPLY_TYPES[m.COMMAND_TYPES[waiting.operation]]
                reply = msgspec.json.decode(waiting.reply, type=reply_type)
                return Finished(reply, context or OperationContext())
            if waiting.state is None:
                return None
            state = self._unseal_state(waiting.state)
            command = msgspec.json.decode(state.command,
                                          type=m.COMMAND_TYPES[waiting.operation])
            replay = _Replay(
                context=state.context,
                snapshot=state.snapshot,
                tape=bytearray(state.tape),
                results=[*state.results, result],
            )
            lock = self._lock(command.se.cin)
            if not lock.locked():
                async with lock:  # free: taken without suspending
                    return await self._run_locked(command, replay, unit)
        return await self._run(command, replay, registry)

    async def _run(
        self, command: m.TsmCommand, replay: _Replay | None, registry: Registry | None = None
    ) -> Step:
        # one SE, one session at a time: they share its counter
        async with self._lock(command.se.cin):
            if replay is None:
                # Over a live link: every write commits on its own, before the script leaves.
                return await self._run_locked(command, None, self.registry)
            # On the bus nothing waits for the phone in here (the operation suspends before
            # a script leaves), so the operation's registry calls make one transaction: a
            # new command's record, its SE's, and its state with the script it waits for
            # commit together, or not at all (a crash before the commit leaves nothing, and
            # the redelivered command starts afresh, as after a crash between the calls).
            async with (registry or self.registry).unit() as unit:
                return await self._run_locked(command, replay, unit)

    def _lock(self, cin: str) -> asyncio.Lock:
        """The SE's lock (kept only while someone holds a reference to it)."""
        lock = self._locks.get(cin)
        if lock is None:
            lock = self._locks[cin] = asyncio.Lock()
        return lock

    async def _run_locked(
        self, command: m.TsmCommand, replay: _Replay | None, registry: Registry
    ) -> Step:
        reply_type = _REPLY_TYPES[type(command)]
        operation = _OPERATION_NAMES[type(command)]
        context = replay.context if replay is not None else OperationContext()
        if replay is not None and replay.snapshot is not None:
            record: SeRecord | None = msgspec.json.decode(replay.snapshot, type=SeRecord)
        else:
            done, record = await registry.begin(
                command.command_id, command.se.cin, operation
            )
            if done is not None and done.status == "done" and done.reply is not None:
                log.info("tsm.operation_replayed", command_id=command.command_id)
                return Finished(msgspec.json.decode(done.reply, type=reply_type), context)
        round_trips = [0]
        token = _replay.set(replay)
        try:
            if record is None:
                record = await self._enrol(command, registry)
            if replay is not None and replay.snapshot is None:
                replay.snapshot = _record_encoder.encode(record)
            if record.kdd != command.se.kdd:
                record = None  # another SE's record: leave it alone
                raise OperationFailed(m.ErrorCode.UNKNOWN_SE, "KDD does not match")
            reply = await self._dispatch(command, record, round_trips)
        except OperationFailed as exc:
            reply = reply_type(
                command_id=command.command_id, failure=exc.failure, round_trips=round_trips[0]
            )
        except _Suspend as suspend:
            assert replay is not None and record is not None  # only a replay suspends
            state = _OperationState(
                command=_reply_encoder.encode(command),
                context=replay.context,
                snapshot=replay.snapshot or b"",
                tape=bytes(replay.tape),
                results=replay.results,
            )
            await registry.suspend(
                record, command.command_id, suspend.script.script_id, self._seal_state(state)
            )
            return Waiting(suspend.device_id, suspend.script, context)
        finally:
            _replay.reset(token)
        if reply.failure is not None and reply.failure.transient:
            # Not recorded as done: the same command id runs again when re-sent.
            await registry.complete(record, command.command_id, None)
            log.warning("tsm.operation_transient_failure", operation=operation,
                        code=reply.failure.code.value)
            return Finished(reply, context)
        await registry.complete(
            record, command.command_id, _reply_encoder.encode(reply),
            self._seal_state(_OperationState(context=context)) if replay else None,
        )
        log.info(
            "tsm.operation_done",
            operation=operation,
            ok=reply.ok,
            code=reply.failure.code.value if reply.failure else None,
            round_trips=reply.round_trips,
        )
        return Finished(reply, context)

    def _draw(self, n: int) -> bytes:
        """Random bytes for the operation; on a replay, the same bytes as the first time."""
        replay = _replay.get()
        if replay is None:
            return self._random(n)
        end = replay.position + n
        if end > len(replay.tape):
            replay.tape += self._random(end - len(replay.tape))
        drawn = bytes(replay.tape[replay.position:end])
        replay.position = end
        return drawn

    def _state_sealer(self, kvn: int) -> AESGCM:
        sealer = self._state_keys.get(kvn)
        if sealer is None:
            master = self.keys.get(kvn)
            key = HKDF(hashes.SHA256(), 32, salt=None, info=_STATE_SEAL_INFO).derive(
                master.enc + master.mac + master.dek
            )
            sealer = self._state_keys[kvn] = AESGCM(key)
        return sealer

    def _seal_state(self, state: _OperationState) -> bytes:
        kvn, nonce = self.keys.current, self._random(12)
        sealed = self._state_sealer(kvn).encrypt(nonce, _state_encoder.encode(state), None)
        return bytes([kvn]) + nonce + sealed

    def _unseal_state(self, sealed: bytes) -> _OperationState:
        try:
            plain = self._state_sealer(sealed[0]).decrypt(sealed[1:13], sealed[13:], None)
        except Exception:  # a wrong or retired key version, or tampered bytes
            raise SecureChannelError("stored operation state unreadable") from None
        return _state_decoder.decode(plain)


    async def _dispatch(
        self, command: m.TsmCommand, record: SeRecord, round_trips: list[int]
    ) -> m.TsmReply:
        """Run the operation; the record is updated in place (saved by ``execute``)."""
        record.device_id = command.device_id
        handler = _HANDLERS[type(command)]
        try:
            return await handler(self, command, record, round_trips)
        except OperationFailed:
            raise
        except s.ScriptFailed as exc:
            raise OperationFailed(m.ErrorCode.CARD_ERROR, f"{exc.step} answered {exc.sw:04X}",
                                  exc.sw) from None
        except SequenceCounterMismatch:
            raise OperationFailed(m.ErrorCode.COUNTER_DRIFT, "counter re-synchronised") from None
        except CryptogramMismatch:
            raise OperationFailed(m.ErrorCode.WRONG_KEYS, "cryptogram does not verify") from None
        except s.BadProof:
            raise OperationFailed(m.ErrorCode.BAD_PROOF, "proof of possession") from None
        except (SecureChannelError, s.UnexpectedAnswer) as exc:
            raise OperationFailed(m.ErrorCode.SECURE_CHANNEL, type(exc).__name__) from None
        except PhoneUnreachable:
            raise OperationFailed(m.ErrorCode.PHONE_UNREACHABLE, "no answer") from None

    async def _enrol(self, command: m.TsmCommand, registry: Registry) -> SeRecord:
        """First contact with an SE: record it under the current master key version.

        Only an SE made with keys diversified from our master keys can answer the card
        cryptogram, so enrolling on first contact trusts nothing the phone says; a wrong
        guess of the counter is corrected by the first INITIALIZE UPDATE answer.
        """
        if len(bytes.fromhex(command.se.kdd)) != 10:
            raise OperationFailed(m.ErrorCode.BAD_REQUEST, "KDD must be 10 bytes")
        record = SeRecord(
            cin=command.se.cin,
            kdd=command.se.kdd,
            device_id=command.device_id,
            key_version=self.keys.current,
            sequence_counter=0,
        )
        await registry.add(record)
        log.info("tsm.se_enrolled", cin=record.cin, kvn=record.key_version)
        return await registry.get(command.se.cin)

    # ------------------------------------------------------------------ sessions

    def _access(self, record: SeRecord) -> s.SeAccess:
        return s.SeAccess(
            self._static_keys(record.key_version, record.kdd),
            record.key_version,
            bytes.fromhex(record.kdd),
        )

    def _static_keys(self, kvn: int, kdd: str) -> StaticKeys:
        cache_key = (kvn, kdd)
        keys = self._se_keys.get(cache_key)
        if keys is None:
            keys = self.keys.get(kvn).static_keys_for(bytes.fromhex(kdd))
            self._se_keys[cache_key] = keys
            if len(self._se_keys) > self._se_keys_max:
                self._se_keys.popitem(last=False)
        else:
            self._se_keys.move_to_end(cache_key)
        return keys

    async def _session(
        self,
        record: SeRecord,
        plan: s.OperationPlan,
        round_trips: list[int],
        temporary_pins: Sequence[m.TemporaryPin] = (),
    ) -> list[ResponseAPDU]:
        """Run ``plan`` in one SCP03 session on the record's SE; the verified answers."""
        device_id = record.device_id or ""
        for attempt in range(1, self._attempts + 1):
            session = s.ScriptSession(
                plan, self._access(record), security_level=self.security_level,
                random=self._draw,
            )
            if record.challenge_mode is ChallengeMode.RANDOM:
                first = await self._send(device_id, plan.operation, session.first_round(), ())
                round_trips[0] += 1
                second = session.second_round(first.responses)
                result = await self._send(device_id, plan.operation, second, temporary_pins)
                round_trips[0] += 1
                plains = session.verify_second_round(result.responses)
                record.last_seen = self._clock()
                return plains
            predicted = record.sequence_counter + 1
            wire = session.offline_script(predicted)
            # Persist intent: the counter is spent even if the script never arrives.
            record.sequence_counter = predicted
            await self._save(record)
            result = await self._send(device_id, plan.operation, wire, temporary_pins)
            round_trips[0] += 1
            try:
                _check_pseudo_random(result.responses)
                plains = session.verify_offline(result.responses)
            except SequenceCounterMismatch as exc:
                if not session.counter_is_authentic(result.responses, exc.actual):
                    raise SecureChannelError("forged sequence counter") from None
                log.warning("tsm.counter_drift", predicted=predicted, actual=exc.actual,
                            attempt=attempt)
                record.sequence_counter = exc.actual
                await self._save(record)
                if attempt == self._attempts:
                    raise
                continue
            except NotPseudoRandom:
                log.info("tsm.random_challenge_se", cin=record.cin)
                record.challenge_mode = ChallengeMode.RANDOM
                await self._save(record)
                continue
            except s.ScriptFailed as exc:
                if exc.step == "INITIALIZE UPDATE":
                    # Refused before the SE derived a challenge: its counter did not move.
                    record.sequence_counter = predicted - 1
                    await self._save(record)
                if (
                    exc.step == "INITIALIZE UPDATE"
                    and exc.sw == s.SW_NOT_FOUND
                    and record.pending_key_version is not None
                    and attempt < self._attempts
                ):
                    # A rotation went through but its answer was lost: the SE has the new keys.
                    log.info("tsm.rotation_confirmed_late", kvn=record.pending_key_version)
                    record.key_version = record.pending_key_version
                    record.pending_key_version = None
                    await self._save(record)
                    continue
                raise
            record.last_seen = self._clock()  # saved by the operation with its outcome
            return plains
        raise OperationFailed(m.ErrorCode.COUNTER_DRIFT, f"no session in {self._attempts} tries")

    async def _save(self, record: SeRecord) -> None:
        """Persist the record before a script leaves (the counter it spends, a rotation's
        intent). On the bus (a replay) nothing is written here: the operation stores the
        record with its state when it suspends or ends, before any script leaves."""
        if _replay.get() is None:
            await self.registry.save(record)

    async def _send(
        self,
        device_id: str,
        operation: str,
        wire: Sequence[s.WireStep],
        temporary_pins: Sequence[m.TemporaryPin],
    ) -> m.SeScriptResult:
        script = m.SeScript(
            script_id=self._draw(16).hex(),
            operation=operation,
            steps=[m.ScriptStep(step.apdu, list(step.expect)) for step in wire],
            temporary_pins=list(temporary_pins),
        )
        replay = _replay.get()
        if replay is None:
            if self.link is None:
                raise PhoneUnreachable("no phone link: the operation must be started")
            result = await self.link.exchange(device_id, script)
        else:
            exchange = replay.exchanges
            replay.exchanges += 1
            if exchange == len(replay.results):
                raise _Suspend(device_id, script)  # the phone's answer is not here yet
            answered = replay.results[exchange]
            if answered is None:
                raise PhoneUnreachable("no answer from the phone in time")
            result = answered
        if result.script_id != script.script_id:
            raise SecureChannelError("answer belongs to another script")
        return result

    # ------------------------------------------------------------------ temporary PINs

    def _seal_key(self, record: SeRecord) -> AESGCM:
        sealer = self._seal_keys.get(record.key_version)
        if sealer is None:
            master = self.keys.get(record.key_version)
            key = HKDF(hashes.SHA256(), 32, salt=None, info=_PIN_SEAL_INFO).derive(
                master.enc + master.mac + master.dek
            )
            sealer = self._seal_keys[record.key_version] = AESGCM(key)
        return sealer

    def _seal_pins(self, record: SeRecord, pins: Sequence[s.TemporaryPinValue]) -> bytes:
        plain = msgspec.json.encode(
            [{"kind": p.kind.value, "pin": p.pin, "puk": p.puk} for p in pins]
        )
        nonce = self._random(12)
        return nonce + self._seal_key(record).encrypt(nonce, plain, record.cin.encode())

    def _unseal_pins(self, record: SeRecord) -> list[s.TemporaryPinValue]:
        sealed = record.sealed_temporary_pins
        if not sealed:
            raise OperationFailed(m.ErrorCode.BAD_REQUEST, "no temporary PINs are pending")
        try:
            plain = self._seal_key(record).decrypt(
                sealed[:12], sealed[12:], record.cin.encode()
            )
        except Exception:  # InvalidTag or a rotated key: the stored PINs are unusable
            raise OperationFailed(m.ErrorCode.BAD_REQUEST, "pending PINs unreadable") from None
        return [
            s.TemporaryPinValue(CertificateKind(p["kind"]), p["pin"], p["puk"])
            for p in msgspec.json.decode(plain)
        ]

    # ------------------------------------------------------------------ operations

    async def _inspect(
        self, command: m.InspectSe, record: SeRecord, round_trips: list[int]
    ) -> m.InspectSeReply:
        (status_answer,) = await self._session(record, s.plan_inspect(), round_trips)
        status = s.interpret_status(status_answer)
        _apply_status(record, status)
        return m.InspectSeReply(
            command_id=command.command_id,
            round_trips=round_trips[0],
            applet_present=status.present,
            life_cycle=status.life_cycle,
            holds_keys=status.holds_keys,
            owner_reference=status.owner_reference,
        )

    async def _cleanup(
        self, command: m.CleanUpSe, record: SeRecord, round_trips: list[int]
    ) -> m.CleanUpSeReply:
        status_answer, delete_answer = await self._session(record, s.plan_cleanup(), round_trips)
        status = s.interpret_status(status_answer)
        record.applet_state, record.holds_keys, record.owner_reference = (
            AppletState.ABSENT, False, None,
        )
        record.pending_cleanup, record.sealed_temporary_pins = False, None
        return m.CleanUpSeReply(
            command_id=command.command_id,
            round_trips=round_trips[0],
            deleted=delete_answer.sw == s.OK,
            held_keys=status.holds_keys,
            owner_reference=status.owner_reference,
        )

    async def _install(
        self, command: m.InstallApplet, record: SeRecord, round_trips: list[int]
    ) -> m.InstallAppletReply:
        _, status_answer = await self._session(record, s.plan_install(), round_trips)
        status = s.interpret_status(status_answer)
        _apply_status(record, status)
        if not status.present or status.life_cycle != 0x07:
            raise OperationFailed(m.ErrorCode.CARD_ERROR, "applet not selectable after INSTALL")
        if status.holds_keys:
            raise OperationFailed(m.ErrorCode.APPLET_HOLDS_KEYS, "clean up before installing")
        return m.InstallAppletReply(
            command_id=command.command_id, round_trips=round_trips[0], installed=True
        )

    async def _prepare(
        self, command: m.PrepareSe, record: SeRecord, round_trips: list[int]
    ) -> m.PrepareSeReply:
        before_answer, delete_answer, _, after_answer = await self._session(
            record, s.plan_prepare(), round_trips
        )
        before, after = s.interpret_status(before_answer), s.interpret_status(after_answer)
        record.pending_cleanup, record.sealed_temporary_pins = False, None
        _apply_status(record, after)
        if not after.present or after.life_cycle != 0x07 or after.holds_keys:
            raise OperationFailed(m.ErrorCode.CARD_ERROR, "applet not clean and selectable "
                                  "after INSTALL")
        return m.PrepareSeReply(
            command_id=command.command_id,
            round_trips=round_trips[0],
            applet_was_present=before.present,
            deleted=delete_answer.sw == s.OK,
            held_keys=before.holds_keys,
            owner_reference=before.owner_reference,
            installed=True,
        )

    async def _generate_keys(
        self, command: m.GenerateKeys, record: SeRecord, round_trips: list[int]
    ) -> m.GenerateKeysReply:
        kinds = list(dict.fromkeys(command.certificates))
        challenges = [self._draw(32) for _ in kinds]
        plan = s.plan_generate_keys(kinds, command.owner_reference, challenges)
        answers = await self._session(record, plan, round_trips)
        keys = [
            s.interpret_generated_key(kind, challenge, answer)
            for kind, challenge, answer in zip(kinds, challenges, answers[1:], strict=True)
        ]
        record.applet_state, record.holds_keys = AppletState.KEYED, True
        record.owner_reference = command.owner_reference
        return m.GenerateKeysReply(
            command_id=command.command_id,
            round_trips=round_trips[0],
            public_keys=[
                m.PublicKey(kind=k.kind, public_key_der=k.public_key_der, challenge=k.challenge,
                            proof=k.proof)
                for k in keys
            ],
        )

    async def _store_certificates(
        self, command: m.StoreCertificates, record: SeRecord, round_trips: list[int]
    ) -> m.StoreCertificatesReply:
        mode = s.TEMPORARY_PIN_MODE[command.pin_option]
        kinds = [c.kind for c in command.certificates]
        if len(set(kinds)) != len(kinds):
            raise OperationFailed(m.ErrorCode.BAD_REQUEST, "a certificate kind appears twice")
        pins = [s.new_temporary_pin(kind, mode, self._draw) for kind in kinds]
        plan = s.plan_store_certificates(
            [(c.kind, c.certificate, c.ca_certificate) for c in command.certificates], mode, pins
        )
        await self._session(record, plan, round_trips)
        record.applet_state = AppletState.PERSONALISED
        record.sealed_temporary_pins = self._seal_pins(record, pins)
        return m.StoreCertificatesReply(
            command_id=command.command_id, round_trips=round_trips[0], stored=kinds
        )

    async def _release(
        self, command: m.ReleasePins, record: SeRecord, round_trips: list[int]
    ) -> m.ReleasePinsReply:
        mode = s.TEMPORARY_PIN_MODE[command.pin_option]
        kinds = list(dict.fromkeys(command.certificates))
        pending = {p.kind: p for p in self._unseal_pins(record)}
        if any(kind not in pending for kind in kinds):
            raise OperationFailed(m.ErrorCode.BAD_REQUEST, "no temporary PIN for that kind")
        pins = [_for_app(pending[kind]) for kind in kinds]
        plan = s.plan_release(kinds, mode)
        answers = await self._session(record, plan, round_trips, pins)
        statuses = [
            answer for answer, step in zip(answers, plan.steps, strict=True)
            if step.command.ins == jpki.INS_GET_PIN_STATUS
        ]
        for status_answer in statuses:
            if s.interpret_pin_status(status_answer).state not in s.RELEASED_STATES[mode]:
                raise OperationFailed(m.ErrorCode.CARD_ERROR, "PIN not in its released state")
        record.applet_state, record.sealed_temporary_pins = AppletState.RELEASED, None
        return m.ReleasePinsReply(
            command_id=command.command_id, round_trips=round_trips[0], released=kinds,
            pins_delivered=True,
        )

    async def _reset_pin(
        self, command: m.ResetPin, record: SeRecord, round_trips: list[int]
    ) -> m.ResetPinReply:
        kinds = list(dict.fromkeys(command.certificates))
        values = [
            s.new_temporary_pin(kind, jpki.TemporaryPinMode.USABLE, self._draw) for kind in kinds
        ]
        answers = await self._session(
            record, s.plan_reset_pin(values), round_trips, [_for_app(v) for v in values]
        )
        for status_answer in answers[1::2]:
            if s.interpret_pin_status(status_answer).state is not jpki.PinState.TEMPORARY:
                raise OperationFailed(m.ErrorCode.CARD_ERROR, "PIN not reset")
        return m.ResetPinReply(
            command_id=command.command_id, round_trips=round_trips[0], reset=kinds,
            pins_delivered=True,
        )

    async def _wipe(
        self, command: m.WipeApplet, record: SeRecord, round_trips: list[int]
    ) -> m.WipeAppletReply:
        (answer,) = await self._session(record, s.plan_wipe(command.delete_applet), round_trips)
        record.holds_keys, record.owner_reference, record.sealed_temporary_pins = False, None, None
        record.applet_state = AppletState.ABSENT if command.delete_applet else AppletState.INSTALLED
        record.pending_cleanup = False
        return m.WipeAppletReply(
            command_id=command.command_id,
            round_trips=round_trips[0],
            wiped=True,
            deleted=command.delete_applet and answer.sw == s.OK,
        )

    async def _rotate_keys(
        self, command: m.RotateKeys, record: SeRecord, round_trips: list[int]
    ) -> m.RotateKeysReply:
        new_kvn = command.new_kvn or self.keys.current
        if new_kvn == record.key_version:  # already there (a re-run after success)
            return m.RotateKeysReply(command_id=command.command_id, key_version=new_kvn)
        new_keys = self._static_keys(new_kvn, record.kdd)
        current = self._access(record)
        plan = s.plan_rotate(record.key_version, new_kvn, current.keys.dek, new_keys)
        record.pending_key_version = new_kvn
        await self._save(record)  # intent: the SE may have the new keys from here on
        (answer,) = await self._session(record, plan, round_trips)
        if record.key_version == new_kvn:  # confirmed late by a 6A88 re-try above
            return m.RotateKeysReply(
                command_id=command.command_id, round_trips=round_trips[0], key_version=new_kvn
            )
        s.interpret_put_key(answer, new_kvn, new_keys)
        sealed = self._unseal_optional(record)
        record.key_version, record.pending_key_version = new_kvn, None
        record.sealed_temporary_pins = self._seal_pins(record, sealed) if sealed else None
        return m.RotateKeysReply(
            command_id=command.command_id, round_trips=round_trips[0], key_version=new_kvn
        )

    def _unseal_optional(self, record: SeRecord) -> list[s.TemporaryPinValue]:
        if not record.sealed_temporary_pins:
            return []
        return self._unseal_pins(record)


def _for_app(value: s.TemporaryPinValue) -> m.TemporaryPin:
    return m.TemporaryPin(kind=value.kind, pin=value.pin, puk=value.puk)


def _apply_status(record: SeRecord, status: s.AppletStatus) -> None:
    record.holds_keys = status.holds_keys
    record.owner_reference = status.owner_reference
    if not status.present:
        record.applet_state = AppletState.ABSENT
    elif not status.holds_keys:
        record.applet_state = AppletState.INSTALLED
    elif record.applet_state in (AppletState.ABSENT, AppletState.INSTALLED):
        record.applet_state = AppletState.UNKNOWN


def _check_pseudo_random(responses: Sequence[bytes]) -> None:
    """Tell a random-challenge SE from a drifted one by the IU answer's ``i`` parameter."""
    if len(responses) < 2 or responses[1][-2:] != b"\x90\x00" or len(responses[1]) < 15:
        return
    if not responses[1][12] & 0x10:  # KDD(10) ‖ KVN ‖ SCP id ‖ i
        raise NotPseudoRandom("SE uses a random card challenge")


_HANDLERS = {
    m.InspectSe: TsmEngine._inspect,
    m.CleanUpSe: TsmEngine._cleanup,
    m.InstallApplet: TsmEngine._install,
    m.PrepareSe: TsmEngine._prepare,
    m.GenerateKeys: TsmEngine._generate_keys,
    m.StoreCertificates: TsmEngine._store_certificates,
    m.ReleasePins: TsmEngine._release,
    m.ResetPin: TsmEngine._reset_pin,
    m.WipeApplet: TsmEngine._wipe,
    m.RotateKeys: TsmEngine._rotate_keys,
}
_REPLY_TYPES: dict[type, type[m.TsmReply]] = {
    m.InspectSe: m.InspectSeReply,
    m.CleanUpSe: m.CleanUpSeReply,
    m.InstallApplet: m.InstallAppletReply,
    m.PrepareSe: m.PrepareSeReply,
    m.GenerateKeys: m.GenerateKeysReply,
    m.StoreCertificates: m.StoreCertificatesReply,
    m.ReleasePins: m.ReleasePinsReply,
    m.ResetPin: m.ResetPinReply,
    m.WipeApplet: m.WipeAppletReply,
    m.RotateKeys: m.RotateKeysReply,
}
_OPERATION_NAMES = {cls: name for name, cls in m.COMMAND_TYPES.items()}
