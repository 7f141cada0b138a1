"""Saga transitions without I/O: replies, timers, branches, pause, operator resume."""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.saga import Failure, Flow, FlowDefinitionError, Retry
from orchestrator.saga.machine import (
    COMPENSATED,
    COMPENSATING,
    COMPLETED,
    FAILED,
    RUNNING,
    Effects,
    Machine,
    Timer,
    command_id,
    parse_command_id,
)
from protocol.envelope import build, decode, encode, message_type
from protocol.errors import Disposition, JpkiError


@message_type("test.saga.cmd.act")
class Act(msgspec.Struct, frozen=True):
    what: str


@message_type("test.saga.reply.act")
class Acted(msgspec.Struct, frozen=True):
    what: str
    failure: Failure | None = None


@message_type("test.saga.event.signed")
class Signed(msgspec.Struct, frozen=True):
    signature: str


@message_type("test.saga.event.aborted")
class Aborted(msgspec.Struct, frozen=True):
    why: str


class Data(msgspec.Struct):
    branch: str = "a"
    log: list[str] = msgspec.field(default_factory=list)
    nonce: int = 0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Transient(JpkiError):
    disposition = Disposition.TRANSIENT


def make_flow() -> Flow[Data]:
    flow = Flow("test.flow", Data, deadline=100, abort_on=[Aborted])

    @flow.local
    def choose(data: Data, ctx) -> None:
        data.nonce = ctx.rng.randrange(1 << 30)

    @flow.command(timeout=5, retry=Retry(max_attempts=2, initial=1, jitter=0))
    def first(data: Data) -> Act:
        return Act("first")

    first.done(lambda data, reply: data.log.append(reply.what))
    first.undo(lambda data: Act("undo-first"), retry=Retry(max_attempts=2, initial=1))

    @flow.command(when=lambda d: d.branch == "b")
    def only_b(data: Data) -> Act:
        return Act("only_b")

    @flow.event(Signed, timeout=30)
    def signature(data: Data) -> None:
        return None

    signature.done(lambda data, event: data.log.append(event.signature))

    @flow.command(timeout=5)
    def second(data: Data) -> Act:
        return Act("second")

    second.undo(lambda data: Act("undo-second"))
    return flow


def reply(saga_id, step, direction, attempt, failure=None, what="x"):
    message = build(Acted(what=what, failure=failure), saga_id=saga_id,
                    causation_id=command_id(saga_id, step, direction, attempt))
    return decode(encode(message))


def sent(fx: Effects) -> list[str]:
    return [o.message_id for o in fx.outgoing]


@pytest.fixture
def world():
    clock = Clock()
    return clock, Machine(clock, random.Random(7)), make_flow()


def test_happy_path_skips_branch_and_waits_for_event(world):
    clock, machine, flow = world
    fx = Effects()
    state = machine.new_saga(flow, "s1", Data(), fx)
    assert state.data.nonce == random.Random(7).randrange(1 << 30)  # injected randomness
    assert sent(fx) == ["s1:first:do:1"]
    assert fx.timers[("s1", "step")] == Timer(1005.0, "first", 1)
    assert fx.timers[("s1", "deadline")] == Timer(1100.0, None, None)
    fx = Effects()
    machine.on_message(state, reply("s1", "first", "do", 1, what="ok"), fx)
    assert state.waiting == "event" and state.current_step.name == "signature"
    assert [e.event for e in fx.timeline] == ["done", "skipped", "waiting"]
    fx = Effects()
    event = decode(encode(build(Signed("sig"), saga_id="s1")))
    machine.on_message(state, event, fx)
    assert sent(fx) == ["s1:second:do:1"]
    machine.on_message(state, reply("s1", "second", "do", 1), fx := Effects())
    assert state.status == COMPLETED
    assert state.data.log == ["ok", "sig"]
    assert fx.timers[("s1", "step")] is None and fx.timers[("s1", "deadline")] is None


def test_command_ids_round_trip():
    parsed = parse_command_id(command_id("a:b", "step_1", "undo", 12))
    assert parsed == ("a:b", "step_1", "undo", 12)
    assert parse_command_id("random-id") is None
    assert parse_command_id("x:y:sideways:1") is None
    assert parse_command_id(None) is None


def test_transient_failure_retries_then_timeout_compensates_including_unknown_step(world):
    clock, machine, flow = world
    state = machine.new_saga(flow, "s2", Data(), Effects())
    fx = Effects()
    machine.on_message(state, reply("s2", "first", "do", 1,
                                    Failure(code="busy", disposition=Disposition.TRANSIENT)), fx)
    assert state.waiting == "retry"
    assert fx.timers[("s2", "step")] == Timer(1001.0, "first", 1)  # initial=1, no jitter
    clock.now = 1001.0
    machine.on_timer(state, "step", Timer(1001.0, "first", 1), fx := Effects())
    assert sent(fx) == ["s2:first:do:2"]
    clock.now = 1006.0
    machine.on_timer(state, "step", Timer(1006.0, "first", 2), fx := Effects())
    # two attempts spent: give up; the last attempt's outcome is unknown, so undo it
    assert state.status == COMPENSATING
    assert state.reason == "first gave up after 2 attempts: timeout"
    assert sent(fx) == ["s2:first:undo:1"]
    machine.on_message(state, reply("s2", "first", "undo", 1), fx := Effects())
    assert state.status == COMPENSATED


def test_rejection_undoes_done_steps_in_reverse_not_the_rejected_one(world):
    clock, machine, flow = world
    state = machine.new_saga(flow, "s3", Data(), Effects())
    machine.on_message(state, reply("s3", "first", "do", 1), Effects())
    machine.on_message(state, decode(encode(build(Signed("sig"), saga_id="s3"))), Effects())
    machine.on_message(state, reply("s3", "second", "do", 1, Failure(code="no")),
                       fx := Effects())
    assert state.reason == "second rejected: no"
    assert sent(fx) == ["s3:first:undo:1"]  # second was rejected: nothing of it to undo


def test_undo_rejected_needs_operator_and_resume_retries_it(world):
    clock, machine, flow = world
    state = machine.new_saga(flow, "s4", Data(), Effects())
    machine.on_message(state, reply("s4", "first", "do", 1), Effects())
    machine.on_message(state, decode(encode(build(Aborted("user"), saga_id="s4"))),
                       fx := Effects())
    assert state.reason == "aborted by test.saga.event.aborted"
    assert sent(fx) == ["s4:first:undo:1"]
    machine.on_message(state, reply("s4", "first", "undo", 1, Failure(code="gone")), Effects())
    assert state.status == FAILED
    assert state.reason == "undo of first rejected: gone"
    assert machine.resume(state, fx := Effects())
    assert state.status == COMPENSATING and sent(fx) == ["s4:first:undo:1"]
    machine.on_message(state, reply("s4", "first", "undo", 1), Effects())
    assert state.status == COMPENSATED


def test_stale_and_foreign_replies_change_nothing(world):
    clock, machine, flow = world
    state = machine.new_saga(flow, "s5", Data(), Effects())
    version_before = (state.position, state.attempt, state.waiting)
    machine.on_message(state, reply("s5", "first", "do", 3), fx := Effects())  # future attempt
    machine.on_message(state, reply("s5", "second", "do", 1), fx)  # not the current step
    machine.on_message(state, reply("other", "first", "do", 1), fx)  # another saga's
    assert (state.position, state.attempt, state.waiting) == version_before
    assert fx.outgoing == [] and fx.timeline == []


def test_pause_holds_next_command_until_resume(world):
    clock, machine, flow = world
    state = machine.new_saga(flow, "s6", Data(branch="b"), Effects())
    assert machine.pause(state, "look", Effects())
    machine.on_message(state, reply("s6", "first", "do", 1), fx := Effects())
    assert fx.outgoing == [] and state.waiting == "resume"
    assert machine.resume(state, fx := Effects())
    assert sent(fx) == ["s6:only_b:do:1"]  # the branch taken when its predicate holds


def test_deadline_compensates_running_saga(world):
    clock, machine, flow = world
    state = machine.new_saga(flow, "s7", Data(), Effects())
    machine.on_message(state, reply("s7", "first", "do", 1), Effects())
    clock.now = 1100.0
    machine.on_timer(state, "deadline", Timer(1100.0, None, None), fx := Effects())
    assert state.status == COMPENSATING and state.reason == "saga deadline exceeded"
    assert sent(fx) == ["s7:first:undo:1"]


def test_local_step_errors_follow_their_disposition():
    clock = Clock()
    machine = Machine(clock, random.Random(1))
    flow = Flow("test.local", Data)
    calls = []

    @flow.local(retry=Retry(max_attempts=3, initial=1, jitter=0))
    def flaky(data: Data) -> None:
        calls.append(1)
        if len(calls) < 2:
            raise Transient("try later")

    state = machine.new_saga(flow, "l1", Data(), fx := Effects())
    assert state.waiting == "retry" and state.status == RUNNING
    clock.now += 1
    machine.on_timer(state, "step", fx.timers[("l1", "step")], Effects())
    assert state.status == COMPLETED and len(calls) == 2


def test_flow_definition_errors_are_caught_early():
    flow = Flow("test.defs", Data)
    flow.command(lambda d: Act("x"), name="one")
    with pytest.raises(FlowDefinitionError):
        flow.command(lambda d: Act("x"), name="one")
    with pytest.raises(FlowDefinitionError):
        flow.command(lambda d: Act("x"), name="Bad Name")
    with pytest.raises(FlowDefinitionError):
        Retry(max_attempts=0)
    with pytest.raises(FlowDefinitionError):
        Flow("Bad", Data)


@given(attempt=st.integers(1, 40), seed=st.integers(0, 2**32))
def test_backoff_stays_within_jitter_and_cap(attempt, seed):
    policy = Retry(max_attempts=None, initial=0.5, multiplier=2, max_delay=30, jitter=0.2)
    delay = policy.delay(attempt, random.Random(seed))
    base = min(30, 0.5 * 2 ** (attempt - 1))
    assert base * 0.8 <= delay <= base * 1.2
