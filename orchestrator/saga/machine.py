"""Saga transitions as pure code: a state, an input, the effects to persist and send.

No I/O here: the engine loads states, feeds them replies, events and fired timers, then
writes the changed states, the timeline, the timers and the outbox in one transaction.
The clock and the randomness (jitter, saga ids) come from the caller.

Positions: while ``running``, ``position`` is the index of the current step; while
``compensating``, the step being undone is ``completed[-1]`` (``completed`` lists the steps
with an undo whose effect may exist, in the order they were done, so popping it undoes
them in reverse). ``attempt`` is the attempt of the current action (do or undo), and
``waiting`` what the saga waits for: ``reply``, ``event``, ``retry`` (a backoff timer) or
``resume`` (the next action is held because the saga is paused).

Which steps are compensated: every done step with an undo, plus the current one when its
outcome is unknown (timed out, or a deadline or abort cut it short); not a step the
participant explicitly rejected, which by contract had no effect.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import structlog

from infra.bus import device_routing_key, routing_key_for
from infra.db.outbox import outgoing
from infra.transport.base import Outgoing
from orchestrator.saga.flow import Action, Failure, Flow, Step, StepContext
from protocol.envelope import Message, build
from protocol.errors import Disposition, JpkiError

log = structlog.get_logger(__name__)

RUNNING = "running"
COMPENSATING = "compensating"
COMPLETED = "completed"
COMPENSATED = "compensated"
FAILED = "failed_needs_operator"
TERMINAL = frozenset({COMPLETED, COMPENSATED, FAILED})
STATUSES = (RUNNING, COMPENSATING, COMPLETED, COMPENSATED, FAILED)

DO = "do"
UNDO = "undo"


def command_id(saga_id: str, step: str, direction: str, attempt: int) -> str:
    """The message id of a step's command: the reply's ``causation_id`` names it back."""
    return f"{saga_id}:{step}:{direction}:{attempt}"


def parse_command_id(causation_id: str | None) -> tuple[str, str, str, int] | None:
    if not causation_id:
        return None
    parts = causation_id.rsplit(":", 3)
    if len(parts) != 4 or parts[2] not in (DO, UNDO) or not parts[3].isdigit():
        return None
    return parts[0], parts[1], parts[2], int(parts[3])


@dataclass(slots=True)
class SagaState:
    saga_id: str
    flow: Flow[Any]
    status: str
    paused: bool
    position: int
    attempt: int
    waiting: str | None
    completed: list[int]
    data: Any
    reason: str | None
    version: int
    created_at: float
    updated_at: float
    is_new: bool = False
    changed: bool = False

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def current_step(self) -> Step[Any] | None:
        if self.status == RUNNING and self.position < len(self.flow.steps):
            return self.flow.steps[self.position]
        if self.status in (COMPENSATING, FAILED) and self.completed:
            return self.flow.steps[self.completed[-1]]
        return None


class TimelineEntry(NamedTuple):  # a tuple: thousands are made per second
    saga_id: str
    at: float
    event: str
    step: str | None = None
    attempt: int | None = None
    detail: str | None = None


class Timer(NamedTuple):
    fire_at: float
    step: str | None
    attempt: int | None


@dataclass(slots=True)
class Effects:
    """Everything one batch of transitions wants persisted, in one transaction."""

    outgoing: list[Outgoing] = field(default_factory=list)
    timeline: list[TimelineEntry] = field(default_factory=list)
    # (saga_id, kind) → the timer to set, or None to delete it
    timers: dict[tuple[str, str], Timer | None] = field(default_factory=dict)
    # (flow, from status, to status) for metrics, and step latencies
    # (flow, step, outcome, seconds)
    transitions: list[tuple[str, str, str]] = field(default_factory=list)
    latencies: list[tuple[str, str, str, float]] = field(default_factory=list)


class Machine:
    def __init__(self, clock: Callable[[], float], rng: random.Random) -> None:
        self.clock = clock
        self.rng = rng

    # -- inputs ----------------------------------------------------------------------------
    def new_saga(self, flow: Flow[Any], saga_id: str, data: Any, fx: Effects) -> SagaState:
        now = self.clock()
        state = SagaState(
            saga_id=saga_id, flow=flow, status=RUNNING, paused=False, position=0, attempt=0,
            waiting=None, completed=[], data=data, reason=None, version=0, created_at=now,
            updated_at=now, is_new=True, changed=True,
        )
        self._note(state, fx, "started", detail=flow.name)
        fx.transitions.append((flow.name, "", RUNNING))
        if flow.deadline is not None:
            fx.timers[(saga_id, "deadline")] = Timer(now + flow.deadline, None, None)
        self._advance(state, fx)
        return state

    def on_message(self, state: SagaState, message: Message, fx: Effects) -> None:
        """A reply (its ``causation_id`` names one of our commands) or an event."""
        if state.terminal:
            log.info("saga_message_after_end", saga_id=state.saga_id, type=message.envelope.type)
            return
        parsed = parse_command_id(message.envelope.causation_id)
        if parsed is not None and parsed[0] == state.saga_id:
            _, step_name, direction, attempt = parsed
            if self._on_reply(state, step_name, direction, attempt, message, fx):
                return
        if isinstance(message.body, state.flow.abort_on):
            if state.status == RUNNING:
                self._begin_compensation(state, fx, f"aborted by {message.envelope.type}",
                                         include_current=True)
            return
        step = state.current_step
        if (
            state.status == RUNNING
            and step is not None
            and step.kind == "event"
            and state.waiting in ("event", "retry", "resume")
            and isinstance(message.body, step.awaits)
        ):
            self._step_done(state, step, message.body, fx)
            return
        log.info("saga_message_ignored", saga_id=state.saga_id, type=message.envelope.type,
                 status=state.status, waiting=state.waiting)

    def on_timer(self, state: SagaState, kind: str, timer: Timer, fx: Effects) -> None:
        fx.timers.setdefault((state.saga_id, kind), None)  # fired: gone unless re-armed
        if state.terminal:
            return
        if kind == "deadline":
            if state.status == RUNNING:
                self._note(state, fx, "deadline")
                self._begin_compensation(state, fx, "saga deadline exceeded", include_current=True)
            return
        step = state.current_step
        if step is None or step.name != timer.step or timer.attempt != state.attempt:
            return  # a timer of an attempt that has since been answered
        if state.waiting == "retry":
            state.attempt += 1
            self._dispatch(state, fx)
        elif state.waiting in ("reply", "event"):
            self._note(state, fx, "timeout", step.name, state.attempt)
            self._retry_or_give_up(state, step, "timeout", fx, unknown_outcome=True)

    def pause(self, state: SagaState, reason: str, fx: Effects) -> bool:
        if state.terminal or state.paused:
            return False
        state.paused = True
        self._note(state, fx, "paused", detail=reason)
        return True

    def resume(self, state: SagaState, fx: Effects) -> bool:
        """Release a paused saga; a saga failed for the operator retries its compensation."""
        if state.status == FAILED:
            state.status = COMPENSATING
            state.paused = False
            state.attempt = 1
            fx.transitions.append((state.flow.name, FAILED, COMPENSATING))
            self._note(state, fx, "resumed", detail="compensation retried by operator")
            self._compensate_next(state, fx)
            return True
        if not state.paused:
            return False
        state.paused = False
        self._note(state, fx, "resumed")
        if state.waiting == "resume":
            self._dispatch(state, fx)
        else:
            state.changed = True
        return True

    # -- transitions -----------------------------------------------------------------------
    def _on_reply(
        self, state: SagaState, step_name: str, direction: str, attempt: int,
        message: Message, fx: Effects,
    ) -> bool:
        step = state.current_step
        expected = DO if state.status == RUNNING else UNDO
        if (
            step is None
            or step.name != step_name
            or direction != expected
            or attempt > state.attempt
            or state.waiting not in ("reply", "event", "retry", "resume")
            or state.status not in (RUNNING, COMPENSATING)
        ):
            log.info("saga_stale_reply", saga_id=state.saga_id, step=step_name,
                     direction=direction, attempt=attempt)
            return True  # ours, but not the answer we wait for: handled by ignoring it
        if step.awaits and direction == DO and not isinstance(message.body, step.awaits):
            log.warning("saga_unexpected_reply_type", saga_id=state.saga_id, step=step_name,
                        type=message.envelope.type)
            return True
        failure = getattr(message.body, "failure", None)
        outcome = "done" if failure is None else _disposition(failure).value
        fx.latencies.append((state.flow.name, step.name if direction == DO else
                             f"{step.name}:undo", outcome,
                             max(0.0, self.clock() - state.updated_at)))
        if direction == DO:
            if failure is None:
                self._step_done(state, step, message.body, fx)
            else:
                self._step_failed(state, step, failure, fx)
        elif failure is None:
            self._note(state, fx, "undone", step.name, state.attempt)
            state.completed.pop()
            self._compensate_next(state, fx)
        elif _disposition(failure) is Disposition.REJECTED:
            self._fail(state, fx, f"undo of {step.name} rejected: {_code(failure)}")
        else:
            self._note(state, fx, "undo_failed", step.name, state.attempt, _code(failure))
            self._retry_or_give_up(state, step, _code(failure), fx, unknown_outcome=False)
        return True

    def _step_done(self, state: SagaState, step: Step[Any], result: Any, fx: Effects) -> None:
        if step.on_done is not None and result is not None:
            step.on_done(state.data, result)
        self._note(state, fx, "done", step.name, state.attempt)
        if step.compensation is not None and step.index not in state.completed:
            state.completed.append(step.index)
        state.position += 1
        self._advance(state, fx)

    def _step_failed(self, state: SagaState, step: Step[Any], failure: Any, fx: Effects) -> None:
        code = _code(failure)
        if _disposition(failure) is Disposition.REJECTED:
            self._note(state, fx, "rejected", step.name, state.attempt, code)
            self._begin_compensation(state, fx, f"{step.name} rejected: {code}",
                                     include_current=False)
        else:
            self._note(state, fx, "failed_transient", step.name, state.attempt, code)
            self._retry_or_give_up(state, step, code, fx, unknown_outcome=False)

    def _retry_or_give_up(
        self, state: SagaState, step: Step[Any], why: str, fx: Effects, *, unknown_outcome: bool
    ) -> None:
        action = step.do if state.status == RUNNING else step.compensation
        assert action is not None  # noqa: S101 - compensating steps always have an undo
        if not action.retry.exhausted(state.attempt):
            delay = action.retry.delay(state.attempt, self.rng)
            state.waiting = "retry"
            state.changed = True
            fx.timers[(state.saga_id, "step")] = Timer(
                self.clock() + delay, step.name, state.attempt
            )
            self._note(state, fx, "retry_scheduled", step.name, state.attempt,
                       f"{why}; next attempt in {delay:.3f}s")
            return
        reason = f"{step.name} gave up after {state.attempt} attempts: {why}"
        if state.status == RUNNING:
            self._begin_compensation(state, fx, reason, include_current=unknown_outcome)
        else:
            self._fail(state, fx, f"undo of {reason}")

    def _begin_compensation(
        self, state: SagaState, fx: Effects, reason: str, *, include_current: bool
    ) -> None:
        step = state.current_step
        if (
            include_current
            and step is not None
            and step.compensation is not None
            and state.waiting in ("reply", "retry")
            and step.index not in state.completed
        ):
            state.completed.append(step.index)
        fx.transitions.append((state.flow.name, state.status, COMPENSATING))
        state.status = COMPENSATING
        state.reason = reason
        state.waiting = None
        fx.timers[(state.saga_id, "deadline")] = None
        self._note(state, fx, "compensating", detail=reason)
        self._compensate_next(state, fx)

    def _compensate_next(self, state: SagaState, fx: Effects) -> None:
        if not state.completed:
            self._finish(state, fx, COMPENSATED)
            return
        state.attempt = 1
        self._dispatch(state, fx)

    def _advance(self, state: SagaState, fx: Effects) -> None:
        steps = state.flow.steps
        while state.position < len(steps):
            step = steps[state.position]
            try:
                applies = step.applies(state.data)
            except Exception as exc:  # a predicate that breaks on this data: stop cleanly
                self._begin_compensation(state, fx, f"{step.name}: when() raised "
                                         f"{type(exc).__name__}", include_current=False)
                return
            if applies:
                state.attempt = 1
                self._dispatch(state, fx)
                return
            self._note(state, fx, "skipped", step.name)
            state.position += 1
        self._finish(state, fx, COMPLETED)

    def _dispatch(self, state: SagaState, fx: Effects) -> None:
        """Run the current action's attempt ``state.attempt`` (held while paused)."""
        state.changed = True
        if state.paused:
            state.waiting = "resume"
            self._note(state, fx, "held", getattr(state.current_step, "name", None),
                       state.attempt)
            return
        step = state.current_step
        assert step is not None  # noqa: S101 - callers position the saga on a step first
        direction = DO if state.status == RUNNING else UNDO
        action: Action = step.do if direction == DO else step.compensation  # type: ignore[assignment]
        now = self.clock()
        ctx = StepContext(state.saga_id, step.name, state.attempt, now, self.rng)
        try:
            body = action.build(state.data, ctx)
        except JpkiError as exc:
            self._local_failure(state, step, direction, exc, fx)
            return
        except Exception as exc:  # a bug in a step function must not wedge the saga
            # the type only: the exception's text may quote saga data
            log.error("saga_step_function_failed", saga_id=state.saga_id, step=step.name,
                      direction=direction, error=type(exc).__name__)
            why = f"{step.name} {direction} raised {type(exc).__name__}"
            if direction == DO:
                self._begin_compensation(state, fx, why, include_current=False)
            else:
                self._fail(state, fx, why)
            return
        if step.kind == "local":
            self._step_done(state, step, None, fx)
            return
        if body is not None:
            message_id = command_id(state.saga_id, step.name, direction, state.attempt)
            device_id = state.flow.device(state.data) if state.flow.device else None
            message = build(body, saga_id=state.saga_id, message_id=message_id,
                            device_id=device_id)
            if action.to_device and device_id:
                routing_key = device_routing_key(device_id)
            else:
                routing_key = routing_key_for(message)  # phone-bound types go to the device
            fx.outgoing.append(outgoing(message, routing_key=routing_key))
        state.waiting = "event" if step.kind == "event" else "reply"
        state.updated_at = now
        fx.timers[(state.saga_id, "step")] = Timer(now + action.timeout, step.name, state.attempt)
        self._note(state, fx, "sent" if body is not None else "waiting", step.name,
                   state.attempt, direction)

    def _local_failure(
        self, state: SagaState, step: Step[Any], direction: str, exc: JpkiError, fx: Effects
    ) -> None:
        failure = Failure(code=type(exc).__name__, disposition=exc.disposition)
        if direction == UNDO:
            if exc.disposition is Disposition.REJECTED:
                self._fail(state, fx, f"undo of {step.name} refused: {failure.code}")
            else:
                self._retry_or_give_up(state, step, failure.code, fx, unknown_outcome=False)
            return
        self._step_failed(state, step, failure, fx)

    def _finish(self, state: SagaState, fx: Effects, status: str) -> None:
        fx.transitions.append((state.flow.name, state.status, status))
        state.status = status
        state.waiting = None
        state.changed = True
        fx.timers[(state.saga_id, "step")] = None
        fx.timers[(state.saga_id, "deadline")] = None
        self._note(state, fx, status, detail=state.reason)

    def _fail(self, state: SagaState, fx: Effects, reason: str) -> None:
        state.reason = reason
        self._finish(state, fx, FAILED)

    def _note(
        self, state: SagaState, fx: Effects, event: str, step: str | None = None,
        attempt: int | None = None, detail: str | None = None,
    ) -> None:
        state.changed = True
        state.updated_at = self.clock()
        fx.timeline.append(TimelineEntry(state.saga_id, state.updated_at, event, step, attempt,
                                         detail))


def _code(failure: Any) -> str:
    return str(getattr(failure, "code", "unknown"))


def _disposition(failure: Any) -> Disposition:
    if not hasattr(failure, "disposition"):
        # the TSM's and the CA's ``Failure`` say it with a ``transient`` property instead
        transient = bool(getattr(failure, "transient", False))
        return Disposition.TRANSIENT if transient else Disposition.REJECTED
    value = getattr(failure, "disposition", Disposition.REJECTED)
    try:
        return Disposition(value)
    except ValueError:
        return Disposition.REJECTED
