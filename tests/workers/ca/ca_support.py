"""Helpers of the CA tests: a person, a card, an application signed by the card, key requests."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from protocol import jpki
from workers.ca import (
    Application,
    BasicFacts,
    CardCertificates,
    CertificateAuthority,
    CertType,
    KeyRequest,
    Passphrase,
    Person,
    SeIdentity,
    Sex,
)
from workers.ca.application import KEY_EF
from workers.ca.profiles import EndEntityTemplate

T0 = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)
WAIT = 10.0
PASSPHRASE = Passphrase(b"test-only ca passphrase")


def make_person(
    person_id: str = "person-0001", address: str = "東京都千代田区永田町一丁目7番1号"
) -> Person:
    return Person(
        person_id=person_id,
        facts=BasicFacts(
            name="山田 花子", date_of_birth=date(1985, 4, 1), sex=Sex.FEMALE, address=address
        ),
        prefecture="東京都",
        city="千代田区",
    )


@dataclass
class Card:
    person: Person
    auth_key: rsa.RSAPrivateKey
    sign_key: rsa.RSAPrivateKey
    certs: CardCertificates


async def issue_card(
    ca: CertificateAuthority, keys, person: Person | None = None, *, expiry: datetime | None = None
) -> Card:
    person = person or make_person()
    auth_key, sign_key = keys(), keys()
    certs = await ca.issue_card_certificates(
        person,
        auth_key.public_key(),
        sign_key.public_key(),
        card_expiry=expiry or T0 + timedelta(days=3650),
    )
    return Card(person, auth_key, sign_key, certs)


SE = SeIdentity(cin="0102030405060708090A", kdd="A1A2A3A4A5A6A7A8A9AA")
OTHER_SE = SeIdentity(cin="1112131415161718191A", kdd="B1B2B3B4B5B6B7B8B9BA")


def application(
    saga_id: str,
    nonce: bytes,
    *,
    se: SeIdentity = SE,
    certificates: tuple[CertType, ...] = (CertType.AUTH, CertType.SIGN),
    requested_at: datetime = T0,
) -> Application:
    return Application(
        application_id=saga_id,
        nonce=nonce,
        device_id="phone-1",
        app_instance_id="f" * 32,
        se=se,
        certificates=list(certificates),
        requested_at=requested_at,
        pin_option=4,
    )


def card_sign(card: Card, app: Application) -> bytes:
    """What the card's COMPUTE DIGITAL SIGNATURE returns over DigestInfo(SHA-256(tbs))."""
    return card.sign_key.sign(app.to_be_signed(), padding.PKCS1v15(), hashes.SHA256())


def spki(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_request(saga_id: str, cert_type: CertType, key: rsa.RSAPrivateKey) -> KeyRequest:
    """What the TSM forwards after GENERATE KEY PAIR (the applet's proof format)."""
    der = spki(key)
    challenge = hashlib.sha256(saga_id.encode() + cert_type.value.encode()).digest()
    message = jpki.proof_message(KEY_EF[cert_type], challenge, der)
    proof = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    return KeyRequest(cert_type=cert_type, public_key_der=der, challenge=challenge, proof=proof)


async def verify(ca: CertificateAuthority, card: Card, saga_id: str, nonce: bytes, **kwargs):
    expected_se = kwargs.pop("expected_se", SE)
    app = application(saga_id, nonce, **kwargs)
    return await ca.verify_application(
        saga_id=saga_id,
        expected_nonce=nonce,
        expected_se=expected_se,
        to_be_signed=app.to_be_signed(),
        signature=card_sign(card, app),
        card_certificate=card.certs.sign.der,
    )


class SigningGate:
    """Holds every certificate signature until ``open()``; counts those that arrived."""

    def __init__(self, monkeypatch) -> None:
        self.arrived = threading.Semaphore(0)
        self._open = threading.Event()
        original = EndEntityTemplate.issue

        def gated(template, **kwargs):
            self.arrived.release()
            if not self._open.wait(WAIT):
                raise TimeoutError("the signing gate was never opened")
            return original(template, **kwargs)

        monkeypatch.setattr(EndEntityTemplate, "issue", gated)

    async def signing(self) -> None:
        assert await asyncio.to_thread(self.arrived.acquire, timeout=WAIT)

    def open(self) -> None:
        self._open.set()
