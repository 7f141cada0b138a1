"""The relying party's login check, against certificates and OCSP answers made by the CA's
own profile and OCSP builders, served over real HTTP."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from device_sim.relying_party import (
    HttpOcspClient,
    LoginRefused,
    RefusalReason,
    RelyingParty,
)
from workers.ca.profiles import (
    CaKind,
    CaNames,
    CertType,
    Issuer,
    auth_subject,
    build_ca_certificate,
    build_end_entity,
)
from workers.ca.revocation import OcspAnswer, build_ocsp_response, issuer_key_hash

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _issuer(generation: int) -> Issuer:
    key = _key()
    certificate = build_ca_certificate(
        name=CaNames().for_kind(CaKind.AUTH),
        key=key,
        serial=generation,
        not_before=NOW - timedelta(days=365),
        not_after=NOW + timedelta(days=3650),
    )
    return Issuer(CaKind.AUTH, generation, certificate, key)


@pytest.fixture(scope="module")
def pki() -> dict[str, object]:
    old, current = _issuer(1), _issuer(2)  # two generations, one name
    user_key = _key()

    def issue(issuer: Issuer, serial: int, *, days: int = 365) -> x509.Certificate:
        return build_end_entity(
            issuer=issuer,
            cert_type=CertType.AUTH,
            subject=auth_subject(f"user{serial}"),
            public_key=user_key.public_key(),
            serial=serial,
            not_before=NOW - timedelta(days=1),
            not_after=NOW + timedelta(days=days),
            facts=None,
        )

    return {
        "old": old,
        "current": current,
        "user_key": user_key,
        "good": issue(current, 1001),
        "revoked": issue(current, 1002),
        "held": issue(current, 1003),
        "old_generation": issue(old, 1004),
        "expired": build_end_entity(
            issuer=current,
            cert_type=CertType.AUTH,
            subject=auth_subject("user1005"),
            public_key=user_key.public_key(),
            serial=1005,
            not_before=NOW - timedelta(days=30),
            not_after=NOW - timedelta(days=1),
            facts=None,
        ),
        "stranger": _issuer(3),  # same name again, never trusted
    }


STATUSES = {
    1002: OcspAnswer(
        ocsp.OCSPCertStatus.REVOKED, NOW - timedelta(hours=1), x509.ReasonFlags.key_compromise
    ),
    1003: OcspAnswer(
        ocsp.OCSPCertStatus.REVOKED, NOW - timedelta(hours=1), x509.ReasonFlags.certificate_hold
    ),
}


@pytest.fixture
async def responder(pki):
    """An OCSP responder on a real socket; ``mode`` lets a test make it misbehave."""
    state = {"mode": "honest", "requests": 0}
    issuers = {i.key_id: i for i in (pki["old"], pki["current"])}

    async def handle(request: web.Request) -> web.Response:
        state["requests"] += 1
        if state["mode"] == "down":
            return web.Response(status=503)
        parsed = ocsp.load_der_ocsp_request(await request.read())
        issuer = next(
            i
            for i in issuers.values()
            if parsed.issuer_key_hash == _key_hash(i.certificate, parsed.hash_algorithm)
        )
        answer = STATUSES.get(parsed.serial_number, OcspAnswer(ocsp.OCSPCertStatus.GOOD))
        if state["mode"] == "forged":
            issuer = pki["stranger"]  # same CA name, another key: not the issuer
        response = build_ocsp_response(
            issuer, parsed, answer, this_update=NOW, validity=timedelta(hours=1)
        )
        return web.Response(
            body=response.public_bytes(Encoding.DER), content_type="application/ocsp-response"
        )

    app = web.Application()
    app.router.add_post("/ocsp", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    state["url"] = f"http://127.0.0.1:{port}/ocsp"
    yield state
    await runner.cleanup()


def _key_hash(certificate: x509.Certificate, algorithm: hashes.HashAlgorithm) -> bytes:
    return issuer_key_hash(certificate, algorithm)


@pytest.fixture
async def rp(pki, responder):
    async with aiohttp.ClientSession() as session:
        yield RelyingParty(
            [pki["old"].certificate, pki["current"].certificate],
            HttpOcspClient(session),
            ocsp_url=responder["url"],
            clock=lambda: NOW,
        )


def _sign(key: rsa.RSAPrivateKey, data: bytes) -> bytes:
    return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(Encoding.DER)


async def _login(rp: RelyingParty, pki, certificate: x509.Certificate, *, tamper: bool = False):
    challenge = rp.challenge()
    signed = challenge.nonce[::-1] if tamper else challenge.nonce
    return await rp.login(
        challenge.challenge_id, challenge.nonce, _der(certificate), _sign(pki["user_key"], signed)
    )


async def test_good_certificate_logs_in(rp, pki, responder):
    accepted = await _login(rp, pki, pki["good"])
    assert accepted.subject == "user1001"
    assert accepted.issuer_key_id == pki["current"].key_id
    assert responder["requests"] == 1


async def test_older_generation_with_the_same_name_is_chained_by_key_id(rp, pki):
    accepted = await _login(rp, pki, pki["old_generation"])
    assert accepted.issuer_key_id == pki["old"].key_id


async def test_bad_signature_is_refused(rp, pki):
    with pytest.raises(LoginRefused) as refused:
        await _login(rp, pki, pki["good"], tamper=True)
    assert refused.value.reason is RefusalReason.BAD_SIGNATURE


async def test_revoked_certificate_is_refused(rp, pki):
    with pytest.raises(LoginRefused) as refused:
        await _login(rp, pki, pki["revoked"])
    assert refused.value.reason is RefusalReason.REVOKED


async def test_held_certificate_is_refused_as_suspended(rp, pki):
    with pytest.raises(LoginRefused) as refused:
        await _login(rp, pki, pki["held"])
    assert refused.value.reason is RefusalReason.SUSPENDED


async def test_expired_certificate_is_refused_before_asking_ocsp(rp, pki, responder):
    with pytest.raises(LoginRefused) as refused:
        await _login(rp, pki, pki["expired"])
    assert refused.value.reason is RefusalReason.CERTIFICATE_EXPIRED
    assert responder["requests"] == 0


async def test_certificate_from_an_untrusted_ca_of_the_same_name_is_refused(rp, pki):
    stranger = pki["stranger"]
    certificate = build_end_entity(
        issuer=stranger,
        cert_type=CertType.AUTH,
        subject=auth_subject("intruder"),
        public_key=pki["user_key"].public_key(),
        serial=7,
        not_before=NOW - timedelta(days=1),
        not_after=NOW + timedelta(days=1),
        facts=None,
    )
    assert certificate.issuer == pki["current"].certificate.subject
    with pytest.raises(LoginRefused) as refused:
        await _login(rp, pki, certificate)
    assert refused.value.reason is RefusalReason.UNTRUSTED_ISSUER


async def test_challenge_is_single_use(rp, pki):
    challenge = rp.challenge()
    signature = _sign(pki["user_key"], challenge.nonce)
    await rp.login(challenge.challenge_id, challenge.nonce, _der(pki["good"]), signature)
    with pytest.raises(LoginRefused) as refused:
        await rp.login(challenge.challenge_id, challenge.nonce, _der(pki["good"]), signature)
    assert refused.value.reason is RefusalReason.UNKNOWN_CHALLENGE


async def test_ocsp_answer_signed_by_another_key_is_refused(rp, pki, responder):
    responder["mode"] = "forged"
    with pytest.raises(LoginRefused) as refused:
        await _login(rp, pki, pki["good"])
    assert refused.value.reason is RefusalReason.OCSP_INVALID


async def test_responder_down_is_a_transient_refusal(rp, pki, responder):
    responder["mode"] = "down"
    with pytest.raises(LoginRefused) as refused:
        await _login(rp, pki, pki["good"])
    assert refused.value.reason is RefusalReason.OCSP_UNAVAILABLE
    assert refused.value.disposition.value == "transient"


async def test_garbage_certificate_is_a_typed_refusal(rp):
    challenge = rp.challenge()
    with pytest.raises(LoginRefused) as refused:
        await rp.login(challenge.challenge_id, challenge.nonce, b"\x30\x03junk", b"")
    assert refused.value.reason is RefusalReason.MALFORMED_CERTIFICATE
