"""The scanner finds a secret in every encoding it claims, and not in lookalikes."""

from __future__ import annotations

import base64
import json
import os

import pytest

from tests.e2e.secrets_scan import Captured, scan

SECRETS = {"auth_pin": "4821", "sign_password": "QZ7XK2MW9P"}


@pytest.mark.parametrize("prefix", [b"", b"a", b"ab", b"abc"])
@pytest.mark.parametrize("secret", ["QZ7XK2MW9P", "4821"])
def test_found_inside_base64_at_every_alignment(prefix: bytes, secret: str) -> None:
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        # a field of its own inside binary data, as in a cleartext APDU or a TLV
        blob = encode(prefix + os.urandom(7) + b"\x04" + secret.encode() + b"\x90\x00").decode()
        payload = json.dumps({"body": {"apdu": blob}}).encode()
        hits = scan([Captured("amqp:x", payload)], SECRETS)
        assert [h.secret_label for h in hits] == [
            "sign_password" if secret.startswith("Q") else "auth_pin"]


def test_found_in_ascii_and_hex() -> None:
    for payload in (b'{"pin":"4821"}', b'{"d":"' + b"4821".hex().upper().encode() + b'"}',
                    b"QZ7XK2MW9P".hex().encode(), b'{"data":"00200080043438323100"}'):
        assert scan([Captured("mqtt:t", payload)], SECRETS), payload


def test_digit_pins_inside_numbers_are_not_hits() -> None:
    payload = b'{"sent_at":"2026-11-29T19:15:11.482134Z","t":1764443711.4821,"n":948217}'
    assert scan([Captured("mqtt:t", payload)], SECRETS) == []


def test_a_pin_equal_to_a_dates_year_is_not_a_hit_in_the_date() -> None:
    payload = b'{"serial":"0A","not_after":"4821-03-13T00:00:00Z"}'
    assert scan([Captured("amqp:ca.reply.issue", payload)], SECRETS) == []
    assert scan([Captured("amqp:x", b'{"pin":"4821","at":"4821-03-13"}')], SECRETS)


def test_digit_pins_inside_encoded_text_are_not_hits() -> None:
    payload = b'{"d":"z5LaLqRRN8oZ3DcB8xZ6+Q9uNL85/LzHgeB1dJ4g4821gVRiGXT1qHgfcCk7YScTn0Av"}'
    assert scan([Captured("mqtt:t", payload)], SECRETS) == []


def test_pin_digits_inside_a_decoded_timestamp_are_not_hits() -> None:
    signed = base64.b64encode(b'{"requested_at":"2026-11-29T19:48:21.123Z"}').decode()
    der_time = base64.b64encode(b"\x17\x0d261129194821Z").decode()
    payload = json.dumps({"to_be_signed": signed, "certificate": der_time}).encode()
    assert scan([Captured("amqp:x", payload)], {"pin": "4821"}) == []


def test_pin_in_a_cleartext_apdu_is_a_hit() -> None:
    verify = bytes.fromhex("0020008004") + b"4821"
    payload = json.dumps({"apdu": base64.b64encode(verify).decode()}).encode()
    assert [h.encoding for h in scan([Captured("amqp:x", payload)], {"pin": "4821"})] == [
        "base64-value"]


def test_random_blobs_do_not_match_a_short_pin() -> None:
    blobs = [base64.b64encode(os.urandom(2048)).decode() for _ in range(50)]
    payload = json.dumps({"certificates": blobs}).encode()
    assert scan([Captured("amqp:x", payload)], {"pin": "4821"}) == []


def test_allowed_path_is_skipped() -> None:
    captured = [Captured("mqtt:jpki/dev/p1/down", b'{"pin":"4821"}')]
    assert scan(captured, SECRETS, allowed=r"/down$") == []
