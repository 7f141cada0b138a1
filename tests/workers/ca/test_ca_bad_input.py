"""Bad input gets a typed refusal, never a crash (hypothesis throws bytes at the CA)."""

from __future__ import annotations

import os

from ca_support import SE, application, card_sign, issue_card
from cryptography.x509 import ocsp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.ca.errors import ApplicationRefused

FAST = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FAST
@given(junk=st.binary(max_size=600))
async def test_any_bytes_get_an_ocsp_answer(ca, junk: bytes) -> None:
    response = ocsp.load_der_ocsp_response(await ca.ocsp(junk))
    assert response.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL


_cards: dict[int, object] = {}


@FAST
@given(
    tbs=st.binary(max_size=300),
    signature=st.binary(max_size=300),
    certificate=st.binary(max_size=300),
    which=st.integers(0, 2),
)
async def test_any_application_bytes_are_refused_with_a_typed_error(
    ca, keys, tbs: bytes, signature: bytes, certificate: bytes, which: int
) -> None:
    # one card per CA: the fixture lives for the whole test, examples share it
    if id(ca) not in _cards:
        _cards[id(ca)] = await issue_card(ca, keys)
    card = _cards[id(ca)]
    nonce = os.urandom(32)
    genuine = application("saga-x", nonce)
    fields = {
        "to_be_signed": genuine.to_be_signed(),
        "signature": card_sign(card, genuine),
        "card_certificate": card.certs.sign.der,
    }
    # replace one of the three with junk; the others stay genuine
    key = ("to_be_signed", "signature", "card_certificate")[which]
    fields[key] = {"to_be_signed": tbs, "signature": signature, "card_certificate": certificate}[
        key
    ]
    try:
        await ca.verify_application(
            saga_id="saga-x", expected_nonce=nonce, expected_se=SE, **fields
        )
    except ApplicationRefused:
        pass
    else:
        raise AssertionError("junk was accepted")
