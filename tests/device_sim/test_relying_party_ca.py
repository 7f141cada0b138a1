"""The relying party against the JPKI CA's own HTTP OCSP responder (``workers/ca/http.py``):
a user-authentication key on a My Number Card the CA issued signs the login challenge over
"NFC"; the CA then holds and revokes the certificate and the relying party follows."""

from __future__ import annotations

import aiohttp
import pytest

from device_sim.app import Secret, SecretKind, read_file, sign_sha256, verify_pin
from device_sim.card import SAMPLE_HOLDER, manufacture_card
from device_sim.fleet import CaCardFactory
from device_sim.relying_party import HttpOcspClient, LoginRefused, RefusalReason, RelyingParty
from device_sim.se.jpki_applet import PooledKeys
from protocol import jpki
from workers.ca.authority import CertificateAuthority, Holder
from workers.ca.http import serve
from workers.ca.keystore import Passphrase
from workers.ca.profiles import CaKind
from workers.ca.revocation import Cause

CARD_AUTH_PIN = "8642"


@pytest.fixture
async def ca_online(tmp_path):
    authority = await CertificateAuthority.open(tmp_path / "ca", Passphrase(b"relying party test"))
    runner = await serve(authority, "127.0.0.1", 0)
    port = runner.addresses[0][1]
    yield authority, f"http://127.0.0.1:{port}/ocsp"
    await runner.cleanup()
    await authority.close()


@pytest.fixture
async def card(ca_online, tmp_path):
    authority, _url = ca_online
    factory = CaCardFactory(authority)
    card = manufacture_card(
        SAMPLE_HOLDER,
        factory.issuer_for("person-rp-1"),
        auth_pin=CARD_AUTH_PIN,
        sign_password="CARDSIGN1",
        key_source=PooledKeys(2, tmp_path / "keys"),
    )
    await factory.record()
    return card


async def _login(rp: RelyingParty, card) -> object:
    challenge = rp.challenge()
    card.transmit(jpki.select_ap().to_bytes())
    pin = Secret(CARD_AUTH_PIN, SecretKind.AUTH_PIN, 0.0)
    assert verify_pin(card, jpki.EF.AUTH_PIN, pin) == 0x9000
    certificate = read_file(card, jpki.EF.AUTH_CERT)
    signature = sign_sha256(card, jpki.EF.AUTH_KEY, challenge.nonce)
    return await rp.login(challenge.challenge_id, challenge.nonce, certificate, signature)


async def test_login_follows_the_ca_status(ca_online, card):
    authority, url = ca_online
    async with aiohttp.ClientSession() as session:
        rp = RelyingParty(
            [authority.issuer(CaKind.AUTH).certificate], HttpOcspClient(session), ocsp_url=url
        )
        accepted = await _login(rp, card)
        record = next(
            r
            for r in await authority.certificates(person_id="person-rp-1", holder=Holder.CARD)
            if r.cert_type.value == "auth"
        )
        assert accepted.serial_number == int(record.serial, 16)

        await authority.hold(record.serial)
        with pytest.raises(LoginRefused) as refused:
            await _login(rp, card)
        assert refused.value.reason is RefusalReason.SUSPENDED

        await authority.release(record.serial)
        assert (await _login(rp, card)).serial_number == accepted.serial_number

        await authority.revoke(record.serial, Cause.CARD_LOST)
        with pytest.raises(LoginRefused) as refused:
            await _login(rp, card)
        assert refused.value.reason is RefusalReason.REVOKED


async def test_a_relying_party_that_trusts_another_ca_refuses(ca_online, card, tmp_path):
    _authority, url = ca_online
    other = await CertificateAuthority.open(tmp_path / "other", Passphrase(b"another test ca"))
    try:
        async with aiohttp.ClientSession() as session:
            rp = RelyingParty(
                [other.issuer(CaKind.AUTH).certificate], HttpOcspClient(session), ocsp_url=url
            )
            with pytest.raises(LoginRefused) as refused:
                await _login(rp, card)
        assert refused.value.reason is RefusalReason.UNTRUSTED_ISSUER
    finally:
        await other.close()
