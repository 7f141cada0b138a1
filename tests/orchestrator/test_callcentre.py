"""Call-centre requests: HMAC-SHA256 by a known operator over the type and every field,
fresh, checked in constant time; keys never in a repr."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from orchestrator import callcentre
from orchestrator import lifecycle_messages as lm
from orchestrator.messages import SeIdentity

KEY = b"k" * 32
PHONE = lm.Phone(device_id="phone-1", se=SeIdentity(cin="0A" * 10, kdd="0A" * 10))


@pytest.fixture(autouse=True)
def keys():
    callcentre.configure(callcentre.OperatorKeys({"desk-1": KEY}))
    yield
    callcentre.configure(callcentre.OperatorKeys({}))


def loss(**changes) -> lm.LossReport:
    fields = {"request_id": uuid.uuid4().hex, "operator": "desk-1",
              "issued_at": datetime.now(UTC), "phone": PHONE, **changes}
    return lm.LossReport(**fields)


def test_a_signed_request_authenticates() -> None:
    request = callcentre.sign(loss(), KEY)
    callcentre.authenticate(request, datetime.now(UTC).timestamp())


@pytest.mark.parametrize(
    "tamper",
    [
        lambda r: msgspec.structs.replace(r, phone=lm.Phone(device_id="phone-2", se=PHONE.se)),
        lambda r: msgspec.structs.replace(r, operator="desk-2"),
        lambda r: msgspec.structs.replace(r, mac=bytes(32)),
        # the same fields under another request type: the type is signed too
        lambda r: lm.FailureReport(**{f: getattr(r, f) for f in r.__struct_fields__}),
    ],
)
def test_any_change_after_signing_is_refused(tamper) -> None:
    request = tamper(callcentre.sign(loss(), KEY))
    with pytest.raises(callcentre.NotAuthenticated):
        callcentre.authenticate(request, datetime.now(UTC).timestamp())


def test_unknown_operator_wrong_key_and_stale_requests_are_refused() -> None:
    now = datetime.now(UTC)
    with pytest.raises(callcentre.NotAuthenticated):
        callcentre.authenticate(callcentre.sign(loss(operator="desk-9"), KEY), now.timestamp())
    with pytest.raises(callcentre.NotAuthenticated):
        callcentre.authenticate(callcentre.sign(loss(), b"x" * 32), now.timestamp())
    old = callcentre.sign(loss(issued_at=now - timedelta(hours=1)), KEY)
    with pytest.raises(callcentre.NotAuthenticated):
        callcentre.authenticate(old, now.timestamp())
    future = callcentre.sign(loss(issued_at=now + timedelta(minutes=10)), KEY)
    with pytest.raises(callcentre.NotAuthenticated):
        callcentre.authenticate(future, now.timestamp())


def test_keys_are_redacted_and_short_keys_refused() -> None:
    keys = callcentre.OperatorKeys({"desk-1": KEY})
    assert KEY.hex() not in repr(keys) and "kkkk" not in repr(keys)
    centre = callcentre.CallCentre(transport=None, operator="desk-1", key=KEY)  # type: ignore[arg-type]
    assert "kkkk" not in repr(centre)
    with pytest.raises(callcentre.NotAuthenticated):
        callcentre.OperatorKeys({"desk-1": b"short"})


def test_keys_file(tmp_path) -> None:
    path = tmp_path / "operators.json"
    path.write_text('{"desk-1": "' + KEY.hex() + '"}')
    assert callcentre.OperatorKeys.from_file(path).key("desk-1") == KEY
