"""The scanner finds a secret in every encoding it claims, and not in lookalikes."""

from __future__ import annotations

import base64
import json

import pytest

from tests.e2e.secrets_scan import Captured, scan

SECRETS = {"auth_pin": "4821", "sign_password": "QZ7XK2MW9P"}


@pytest.mark.parametrize("prefix", [b"", b"a", b"ab", b"abc"])
def test_found_in_base64_at_every_alignment(prefix: bytes) -> None:
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        payload = json.dumps({"x": encode(prefix + b"QZ7XK2MW9P" + b"tail").decode()})
        hits = scan([Captured("amqp:x", payload.encode())], SECRETS)
        assert [h.secret_label for h in hits] == ["sign_password"]


def test_found_in_ascii_and_hex() -> None:
    for payload in (b'{"pin":"4821"}', b'{"d":"' + b"4821".hex().upper().encode() + b'"}',
                    b"QZ7XK2MW9P".hex().encode()):
        assert scan([Captured("mqtt:t", payload)], SECRETS), payload


def test_digit_pins_inside_numbers_are_not_hits() -> None:
    payload = b'{"sent_at":"2026-11-29T19:15:11.482134Z","t":1764443711.4821,"n":948217}'
    assert scan([Captured("mqtt:t", payload)], SECRETS) == []


def test_allowed_path_is_skipped() -> None:
    captured = [Captured("mqtt:jpki/dev/p1/down", b'{"pin":"4821"}')]
    assert scan(captured, SECRETS, allowed=r"/down$") == []
