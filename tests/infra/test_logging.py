"""Logging: JSON lines with the bound ids, secrets redacted by field name at any depth."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog

from infra.logging import REDACTED, configure_logging, is_secret_name, log_context


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("test-service", pretty=False, stream=stream)
    yield stream
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize(
    "name",
    ["pin", "temp_pin", "userPassword", "master-key", "enc_key", "temporary_pins", "api_token"],
)
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name", ["routing_key", "key_version", "saga_id", "device_id", "pin_option", "spinner"]
)
def test_names_that_are_not_secret(name: str) -> None:
    assert not is_secret_name(name)


def test_json_line_carries_context_and_never_the_secret(captured: io.StringIO) -> None:
    log = structlog.get_logger("t")
    with log_context(saga_id="saga-1", step="install", device_id="dev-1"):
        log.info(
            "pin.set",
            temp_pin="1234",
            routing_key="device.dev-1",
            details={"user": {"newPin": "5678", "tries": 3}, "items": [{"key": "00112233"}]},
        )
    log.info("after")
    first, after = lines(captured)
    assert first["event"] == "pin.set"
    assert (first["saga_id"], first["step"], first["device_id"]) == ("saga-1", "install", "dev-1")
    assert first["service"] == "test-service" and first["level"] == "info"
    assert first["temp_pin"] == REDACTED
    assert first["routing_key"] == "device.dev-1"
    assert first["details"] == {
        "user": {"newPin": REDACTED, "tries": 3},
        "items": [{"key": REDACTED}],
    }
    text = captured.getvalue()
    assert "1234" not in text and "5678" not in text and "00112233" not in text
    assert "saga_id" not in after and after["service"] == "test-service"


def test_pretty_console_in_a_terminal(captured: io.StringIO) -> None:
    stream = io.StringIO()
    configure_logging("svc", pretty=True, stream=stream)
    structlog.get_logger().warning("hello", password="hunter2", device_id="d1")
    text = stream.getvalue()
    assert "hello" in text and "d1" in text
    assert "hunter2" not in text and REDACTED in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
