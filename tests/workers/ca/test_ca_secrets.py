"""No CA key, passphrase or card signature in any log line of a whole CA run."""

from __future__ import annotations

import base64
import os

import structlog
from ca_support import PASSPHRASE, SE, application, card_sign, issue_card, key_request
from cryptography.hazmat.primitives import serialization

from workers.ca import Cause, CertificateAuthority, CertType


async def test_log_lines_carry_no_secrets(tmp_path, keys, clock) -> None:
    with structlog.testing.capture_logs() as lines:
        ca = await CertificateAuthority.open(tmp_path / "d", PASSPHRASE, new_key=keys, clock=clock)
        card = await issue_card(ca, keys)
        nonce = os.urandom(32)
        app = application("saga-1", nonce)
        signature = card_sign(card, app)
        await ca.verify_application(
            saga_id="saga-1",
            expected_nonce=nonce,
            expected_se=SE,
            to_be_signed=app.to_be_signed(),
            signature=signature,
            card_certificate=card.certs.sign.der,
        )
        requests = [
            key_request("saga-1", CertType.AUTH, keys()),
            key_request("saga-1", CertType.SIGN, keys()),
        ]
        issued = await ca.issue("saga-1", requests)
        await ca.revoke(issued[0].serial, Cause.LOSS)
        issuers = ca.generations()
        await ca.close()
    text = repr(lines)
    assert lines, "the run logged nothing: the test would prove nothing"
    forbidden = [
        PASSPHRASE.value.decode(),
        signature.hex(),
        base64.b64encode(signature).decode()[:40],
        nonce.hex(),
        "PRIVATE KEY",
    ]
    for issuer in issuers:
        numbers = issuer.key.private_numbers()
        forbidden += [f"{numbers.d:x}"[:32], str(numbers.d)[:32]]
        forbidden.append(
            issuer.key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).hex()[:64]
        )
    for request in requests:
        forbidden.append(request.proof.hex()[:64])
    leaked = [secret for secret in forbidden if secret and secret in text]
    assert leaked == []
