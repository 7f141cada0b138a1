"""The app ↔ orchestrator schemas: round trips, validation, canonical signed bytes."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from orchestrator.messages import (
    Application,
    CardSignatureRequest,
    CertificateKind,
    Enrolment,
    Outcome,
    PinOption,
    Reason,
    Result,
    SeIdentity,
)
from protocol import envelope

APP_ID = "0123456789abcdef0123456789abcdef"
SE = SeIdentity(cin="0102030405060708090A", kdd="A1A2A3A4A5A6A7A8A9AA")


def _enrolment_json(**overrides: object) -> bytes:
    body = {
        "application_id": APP_ID,
        "device_id": "phone-1",
        "app_instance_id": "f" * 32,
        "model": "Pixel 8",
        "os_name": "android",
        "os_version": "14",
        "se_present": True,
        "se": {"cin": SE.cin, "kdd": SE.kdd},
        "certificates": ["auth", "sign"],
    }
    body.update(overrides)
    env = {
        "message_id": "m1",
        "type": "app.event.enrolment",
        "schema_version": 1,
        "sent_at": "2026-01-01T00:00:00Z",
        "body": body,
    }
    return msgspec.json.encode(env)


def test_enrolment_decodes_with_default_pin_option_4() -> None:
    message = envelope.decode(_enrolment_json())
    assert isinstance(message.body, Enrolment)
    assert message.body.pin_option is PinOption.INITIAL_STATE
    assert message.body.certificates == [CertificateKind.AUTH, CertificateKind.SIGN]


@pytest.mark.parametrize(
    "overrides",
    [
        {"certificates": []},
        {"certificates": ["auth", "auth"]},
        {"certificates": ["auth", "sign", "auth"]},
        {"certificates": ["pin"]},
        {"pin_option": 7},
        {"application_id": "not-hex"},
        {"se": {"cin": "zz", "kdd": "00"}},
        {"device_id": "a/b"},  # would escape the per-device MQTT topic
    ],
)
def test_bad_enrolment_is_a_typed_error(overrides: dict[str, object]) -> None:
    with pytest.raises(envelope.InvalidMessage):
        envelope.decode(_enrolment_json(**overrides))


def test_signed_bytes_do_not_depend_on_certificate_order() -> None:
    common = dict(
        application_id=APP_ID,
        nonce=bytes(range(16)),
        device_id="phone-1",
        app_instance_id="f" * 32,
        se=SE,
        requested_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    a = Application(certificates=[CertificateKind.SIGN, CertificateKind.AUTH], **common)
    b = Application(certificates=[CertificateKind.AUTH, CertificateKind.SIGN], **common)
    assert a.to_be_signed() == b.to_be_signed()
    assert b"000102030405060708090a0b0c0d0e0f" not in a.to_be_signed()  # nonce is base64
    c = Application(certificates=[CertificateKind.AUTH], **common)
    assert c.to_be_signed() != a.to_be_signed()


def test_request_and_result_round_trip() -> None:
    application = Application(
        application_id=APP_ID,
        nonce=b"\x01" * 32,
        device_id="phone-1",
        app_instance_id="f" * 32,
        se=SE,
        certificates=[CertificateKind.AUTH],
        requested_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    for body in (
        CardSignatureRequest(application=application),
        Result(outcome=Outcome.REFUSED, phase=1, reason=Reason.UNSUPPORTED_MODEL),
    ):
        raw = envelope.encode(envelope.build(body, saga_id=APP_ID))
        decoded = envelope.decode(raw)
        assert decoded.body == body
        assert decoded.envelope.saga_id == APP_ID
