"""structlog for every process: JSON lines for services, a readable console in a terminal.

Every line carries the context bound with ``log_context`` (saga_id, step, device_id,
message type...) through contextvars, so a handler deep in a saga logs with its saga's
ids without passing them around. A processor redacts any field whose name says it
holds a secret (pin, password, key, temp_pin, ...), however deep in a dict or list it
sits: a secret that slips into a log call is replaced by ``[REDACTED]``, never written.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any, TextIO

import structlog

REDACTED = "[REDACTED]"

# Name parts that mark a secret. Matched against the parts of a field name split on
# "_", "-" and camelCase, so "temp_pin", "userPassword" and "master-key" all match.
SECRET_PARTS = frozenset(
    {
        "pin",
        "pins",
        "password",
        "passwords",
        "passwd",
        "passphrase",
        "secret",
        "secrets",
        "key",
        "keys",
        "token",
        "credential",
        "credentials",
        "authorization",
        "cookie",
        "otp",
    }
)
# Names that contain a secret word but hold none (identifiers, counters, public data).
NOT_SECRET = frozenset(
    {
        "routing_key",
        "routing_keys",
        "binding_keys",
        "key_version",
        "key_id",
        "key_ids",
        "public_key",
        "key_usage",
        "pin_option",
        "pin_state",
        "pin_tries",
        "pin_tries_left",
    }
)

_PARTS = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")


def is_secret_name(name: str) -> bool:
    if name.lower() in NOT_SECRET:
        return False
    return any(part.lower() in SECRET_PARTS for part in _PARTS.findall(name))


def _redact(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            key: REDACTED if isinstance(key, str) and is_secret_name(key) else _redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_redact(item) for item in value)
    return value


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: secret-named fields (at any depth) become ``[REDACTED]``."""
    for key in list(event_dict):
        if key == "event":
            continue
        if is_secret_name(key):
            event_dict[key] = REDACTED
        else:
            event_dict[key] = _redact(event_dict[key])
    return event_dict


def configure_logging(
    service: str,
    *,
    level: str = "INFO",
    pretty: bool | None = None,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog for this process (``pretty`` defaults to "is a terminal")."""
    out = stream or sys.stderr
    if pretty is None:
        pretty = out.isatty()
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=True)
        if pretty
        else structlog.processors.JSONRenderer(sort_keys=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)


@contextmanager
def log_context(**ids: Any) -> Iterator[None]:
    """Bind ids (saga_id, step, device_id, ...) to every log line inside the block."""
    with structlog.contextvars.bound_contextvars(**ids):
        yield
