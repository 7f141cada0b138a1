"""What the card manager needs from an applet, and what an applet learns from it.

The secure channel belongs to the security domain (GP Card Spec v2.3.1 §10, the
``GPSystem.getSecureChannel`` model): while the selected applet is associated with a
security domain, INITIALIZE UPDATE and EXTERNAL AUTHENTICATE are processed by that
domain's SCP03 session, every later command is unwrapped by the card manager before the
applet sees it and every response wrapped after. The applet only learns, per command,
whether it arrived inside an authenticated SCP03 session of the SP-TSM
(``CommandContext.secure``) — that is what gates the personalisation commands.
Selecting another application ends the session.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from protocol.apdu import CommandAPDU, ResponseAPDU


@dataclass(frozen=True, slots=True)
class CommandContext:
    secure: bool  # inside an authenticated SCP03 session of the applet's security domain
    security_level: int = 0  # SCP03 level of that session (0x33 = C-MAC|C-DEC|R-MAC|R-ENC)


class Applet(Protocol):
    aid: bytes

    def on_select(self) -> ResponseAPDU:
        """Called on SELECT by AID (also the logout: volatile PIN state is cleared)."""

    def on_deselect(self) -> None: ...

    def process(self, command: CommandAPDU, context: CommandContext) -> ResponseAPDU: ...

    def holds_keys(self) -> bool:
        """Whether a private key exists in the applet (phase-2 clean-up rule)."""

    def owner_reference(self) -> str | None:
        """Opaque reference of the person whose keys the applet holds, set at personalisation."""

    def to_state(self) -> dict[str, Any]:
        """JSON-serialisable state, so that the SE survives an app reinstall or factory reset."""


class AppletFactory(Protocol):
    """Creates an applet instance at INSTALL [for install] from its load file (ELF AID)."""

    def __call__(self, instance_aid: bytes, install_parameters: bytes) -> Applet: ...

    def restore(self, state: dict[str, Any]) -> Applet: ...
