"""The card-signed application, where a flow needs the user's card to authorise the SP-TSM's
work: issuance steps 5–6 (FLOWS.md §1), PIN reset and the reissue after a phone is found
(§4). Each flow declares its own steps, so that it reads like the process; these are the
bodies those steps share.
"""

from __future__ import annotations

from typing import Protocol

from orchestrator.messages import Application, CardSignature
from workers.ca import application as ca_app
from workers.ca import messages as ca


class CardSignedData(Protocol):
    """The fields a flow's data keeps for its card-signed application."""

    nonce: bytes | None
    to_be_signed: bytes | None
    card_signature: bytes | None
    card_certificate: bytes | None
    person_id: str | None


def keep_card_signature(data: CardSignedData, application: Application,
                        answer: CardSignature) -> None:
    """The phone's answer: the card's signature over exactly this application."""
    data.to_be_signed = application.to_be_signed()
    data.card_signature = answer.signature
    data.card_certificate = answer.card_certificate


def verify_application(data: CardSignedData, command_id: str,
                       se: ca_app.SeIdentity) -> ca.VerifyApplication:
    """The CA checks the card signature, the card certificate's chain, validity and
    revocation, the nonce (fresh, single use) and the binding to this SE."""
    return ca.VerifyApplication(
        command_id=command_id, se=se, nonce=data.nonce or b"",
        to_be_signed=data.to_be_signed or b"", signature=data.card_signature or b"",
        card_certificate=data.card_certificate or b"",
    )


def keep_verified(data: CardSignedData, reply: ca.ApplicationVerified) -> None:
    data.person_id = reply.person_id
    data.card_certificate = None  # verified and recorded by the CA; no need to keep it
