"""Flows as code: an ordered list of steps, each undo registered beside its do.

A flow reads like the process (Temporal's saga samples)::

    order = Flow("demo.order", OrderData, deadline=600)

    @order.command(timeout=5, retry=Retry(max_attempts=3))
    def reserve(data: OrderData) -> Reserve:            # the command this step sends
        return Reserve(order_id=data.order_id, quantity=data.quantity)

    @reserve.done                                       # what the reply changes
    def _(data: OrderData, reply: Reserved) -> None:
        data.reservation = reply.reservation

    @reserve.undo(timeout=5)                            # its compensation, right here
    def _(data: OrderData) -> Release:
        return Release(order_id=data.order_id)

Kinds of step:

- ``@flow.command``: send a command (routed by its type, or to ``device.<device_id>`` with
  ``to_device=True``) and await the reply whose envelope ``causation_id`` is that command's
  message id (saga id + step + direction + attempt). A reply carrying ``failure`` (a
  ``Failure``) is *rejected* (compensate) or *transient* (retry per policy); any other reply
  is *done* and goes to the ``done`` handler.
- ``@flow.event(EventType)``: optionally send a request (usually to the phone), then await
  an event of that type for this saga (matched by the envelope's ``saga_id``).
- ``@flow.local``: pure code on the saga data (a decision, a nonce from the injected
  randomness); raising a ``JpkiError`` rejects or retries it like a reply would.

Every step takes ``when=`` (a predicate on the data: the step runs only if it holds, for
branches such as the phase-3 state check), ``timeout=`` (seconds per attempt) and
``retry=`` (a ``Retry``). Step functions must be deterministic functions of the saga data
(and the ``StepContext`` they may ask for): the engine may call them again after a crash.
Do and undo must be idempotent at the participant, keyed by saga id and step name (every
message carries both).
"""

from __future__ import annotations

import inspect
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec

from protocol.errors import Disposition, JpkiError

D = TypeVar("D", bound=msgspec.Struct)
F = TypeVar("F", bound=Callable[..., Any])

_STEP_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class FlowDefinitionError(JpkiError):
    """A flow that cannot run as written (caught at import time, not mid-saga)."""


class Failure(msgspec.Struct, frozen=True, kw_only=True):
    """Why a participant did not do a step; put it in the reply's ``failure`` field.

    ``code`` is a stable error code (an enum value of the participant), never exception
    text that could carry a secret.
    """

    code: str
    disposition: Disposition = Disposition.REJECTED
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Retry:
    """Attempts and exponential backoff with jitter between them.

    ``max_attempts=None`` retries for ever (the default for compensations: an undo is
    retried until done). The delay before attempt ``n+1`` is
    ``min(max_delay, initial * multiplier**(n-1))``, spread by ±``jitter`` of itself.
    """

    max_attempts: int | None = 3
    initial: float = 0.5
    multiplier: float = 2.0
    max_delay: float = 30.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise FlowDefinitionError("max_attempts must be at least 1")
        if not 0.0 <= self.jitter < 1.0 or self.initial < 0 or self.multiplier < 1:
            raise FlowDefinitionError("retry policy out of range")

    def exhausted(self, attempt: int) -> bool:
        return self.max_attempts is not None and attempt >= self.max_attempts

    def delay(self, attempt: int, rng: random.Random) -> float:
        base = min(self.max_delay, self.initial * self.multiplier ** max(0, attempt - 1))
        return max(0.0, base * (1.0 + self.jitter * (2.0 * rng.random() - 1.0)))


DEFAULT_RETRY = Retry()
UNDO_RETRY = Retry(max_attempts=None, initial=0.5, max_delay=60.0)


@dataclass(slots=True)
class StepContext:
    """What a step function may know besides the data (ask for it with a 2nd parameter)."""

    saga_id: str
    step: str
    attempt: int
    now: float
    rng: random.Random


@dataclass(slots=True)
class Action:
    """The do or the undo of a step."""

    send: Callable[..., Any] | None
    timeout: float
    retry: Retry
    to_device: bool = False
    wants_context: bool = False

    def build(self, data: Any, ctx: StepContext) -> Any:
        if self.send is None:
            return None
        return self.send(data, ctx) if self.wants_context else self.send(data)


@dataclass(slots=True)
class Step(Generic[D]):
    name: str
    kind: str  # "command" | "event" | "local"
    do: Action
    when: Callable[[Any], bool] | None = None
    awaits: tuple[type, ...] = ()  # reply / event body types accepted (empty: any reply)
    on_done: Callable[..., None] | None = None
    compensation: Action | None = None
    index: int = -1

    # -- registration beside the do ------------------------------------------------------
    def done(self, fn: F) -> F:
        """``fn(data, reply_or_event)``: fold the step's result into the saga data."""
        self.on_done = fn
        return fn

    def undo(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        timeout: float = 10.0,
        retry: Retry = UNDO_RETRY,
        to_device: bool = False,
    ) -> Any:
        """Register the compensation: a function of the data returning the command to
        send (its reply is awaited like a do's), retried until done."""
        if self.kind != "command":
            raise FlowDefinitionError(f"step {self.name}: only command steps can be undone")

        def register(send: Callable[..., Any]) -> Callable[..., Any]:
            self.compensation = Action(
                send=send,
                timeout=timeout,
                retry=retry,
                to_device=to_device,
                wants_context=_wants_context(send),
            )
            return send

        return register(fn) if fn is not None else register

    def applies(self, data: Any) -> bool:
        return self.when is None or bool(self.when(data))


def _wants_context(fn: Callable[..., Any]) -> bool:
    return len(inspect.signature(fn).parameters) >= 2


class Flow(Generic[D]):
    """A named saga type: its data type, its steps in order and how it starts.

    ``start_on``: a message type that starts a saga of this flow when it reaches the
    orchestrator, with ``initial(message) -> data``; the saga id is the envelope's
    ``saga_id`` (so a re-sent start lands on the same saga) or else its message id.
    ``abort_on``: event types that, for a running saga, stop it and compensate.
    ``deadline``: seconds from start after which a saga still running is compensated.
    ``device``: where ``to_device`` steps send (``data -> device_id``).
    """

    def __init__(
        self,
        name: str,
        data_type: type[D],
        *,
        deadline: float | None = None,
        device: Callable[[D], str] | None = None,
        start_on: type | None = None,
        initial: Callable[[Any], D] | None = None,
        abort_on: Sequence[type] = (),
    ) -> None:
        if not re.match(r"^[a-z][a-z0-9_.]{0,99}$", name):
            raise FlowDefinitionError(f"flow name {name!r}: lower case, digits, '_' and '.'")
        if (start_on is None) != (initial is None):
            raise FlowDefinitionError("start_on and initial go together")
        self.name = name
        self.data_type = data_type
        self.deadline = deadline
        self.device = device
        self.start_on = start_on
        self.initial = initial
        self.abort_on = tuple(abort_on)
        self.steps: list[Step[D]] = []
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(data_type)

    # -- step decorators -----------------------------------------------------------------
    def command(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        timeout: float = 10.0,
        retry: Retry = DEFAULT_RETRY,
        when: Callable[[D], bool] | None = None,
        reply: type | tuple[type, ...] = (),
        to_device: bool = False,
    ) -> Any:
        def register(send: Callable[..., Any]) -> Step[D]:
            action = Action(send, timeout, retry, to_device, _wants_context(send))
            awaits = reply if isinstance(reply, tuple) else (reply,)
            return self._add(Step(name or send.__name__, "command", action, when, awaits))

        return register(fn) if fn is not None else register

    def event(
        self,
        event_type: type | tuple[type, ...],
        *,
        name: str | None = None,
        timeout: float = 600.0,
        retry: Retry = Retry(max_attempts=1),
        when: Callable[[D], bool] | None = None,
        to_device: bool = True,
    ) -> Callable[[Callable[..., Any]], Step[D]]:
        """Await an event of ``event_type``; the decorated function returns the request to
        send first (``None``: send nothing). A timeout retries (re-sending the request)."""
        awaits = event_type if isinstance(event_type, tuple) else (event_type,)

        def register(send: Callable[..., Any]) -> Step[D]:
            action = Action(send, timeout, retry, to_device, _wants_context(send))
            return self._add(Step(name or send.__name__, "event", action, when, awaits))

        return register

    def local(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        when: Callable[[D], bool] | None = None,
        retry: Retry = DEFAULT_RETRY,
    ) -> Any:
        """Run ``fn(data[, ctx])`` in the orchestrator; it changes the data in place."""

        def register(run: Callable[..., Any]) -> Step[D]:
            action = Action(run, 0.0, retry, False, _wants_context(run))
            return self._add(Step(name or run.__name__, "local", action, when))

        return register(fn) if fn is not None else register

    def _add(self, step: Step[D]) -> Step[D]:
        if not _STEP_NAME.match(step.name):
            raise FlowDefinitionError(f"step name {step.name!r}: lower case, digits and '_'")
        if any(s.name == step.name for s in self.steps):
            raise FlowDefinitionError(f"flow {self.name}: step {step.name} defined twice")
        step.index = len(self.steps)
        self.steps.append(step)
        return step

    def step_named(self, name: str) -> Step[D]:
        for step in self.steps:
            if step.name == name:
                return step
        raise FlowDefinitionError(f"flow {self.name} has no step {name!r}")

    # -- data (JSON via msgspec) ---------------------------------------------------------
    def encode_data(self, data: D) -> bytes:
        return self._encoder.encode(data)

    def decode_data(self, raw: bytes | str) -> D:
        return self._decoder.decode(raw)

    def __repr__(self) -> str:
        return f"Flow({self.name!r}, steps={[s.name for s in self.steps]})"


@dataclass(slots=True)
class FlowRegistry:
    flows: dict[str, Flow[Any]] = field(default_factory=dict)

    def add(self, flow: Flow[Any]) -> None:
        if flow.name in self.flows and self.flows[flow.name] is not flow:
            raise FlowDefinitionError(f"two flows named {flow.name}")
        if not flow.steps:
            raise FlowDefinitionError(f"flow {flow.name} has no steps")
        self.flows[flow.name] = flow

    def get(self, name: str) -> Flow[Any]:
        flow = self.flows.get(name)
        if flow is None:
            raise FlowDefinitionError(f"no flow named {name!r} in this orchestrator")
        return flow
