"""Messages of the demo saga (reserve → charge → ship) and its participant.

The participant consumes ``demo.cmd.#``; it answers every command it acts on with one
``demo.reply.step`` whose ``causation_id`` is the command's message id.
"""

from __future__ import annotations

import msgspec

from orchestrator.saga.flow import Failure
from protocol.envelope import message_type


class DemoCommand(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    amount: int = 0
    reject: bool = False  # answer with a rejection instead of acting (tests, demos)
    stall: bool = False  # act on nothing and answer nothing (a lost participant)


@message_type("demo.cmd.reserve")
class Reserve(DemoCommand, frozen=True, kw_only=True):
    pass


@message_type("demo.cmd.release")
class Release(DemoCommand, frozen=True, kw_only=True):
    pass


@message_type("demo.cmd.charge")
class Charge(DemoCommand, frozen=True, kw_only=True):
    pass


@message_type("demo.cmd.refund")
class Refund(DemoCommand, frozen=True, kw_only=True):
    pass


@message_type("demo.cmd.ship")
class Ship(DemoCommand, frozen=True, kw_only=True):
    pass


@message_type("demo.cmd.unship")
class Unship(DemoCommand, frozen=True, kw_only=True):
    pass


@message_type("demo.reply.step")
class StepReply(msgspec.Struct, frozen=True, kw_only=True):
    step: str
    action: str  # "do" | "undo"
    applied: bool  # False: nothing was done (rejected, or nothing to undo)
    failure: Failure | None = None


# command type → (step it belongs to, do or undo)
ACTIONS: dict[type, tuple[str, str]] = {
    Reserve: ("reserve", "do"),
    Release: ("reserve", "undo"),
    Charge: ("charge", "do"),
    Refund: ("charge", "undo"),
    Ship: ("ship", "do"),
    Unship: ("ship", "undo"),
}
