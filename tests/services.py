"""What a test does when a service or tool it needs is missing: skip loudly, or fail in CI."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(reason: str) -> NoReturn:
    """Skip with ``reason`` (which says "SKIPPED"); with ``JPKI_REQUIRE_SERVICES=1`` (CI
    sets it) fail instead, so that a missing service cannot pass for a green run."""
    if os.environ.get("JPKI_REQUIRE_SERVICES") == "1":
        pytest.fail(reason.replace("SKIPPED", "FAILED because JPKI_REQUIRE_SERVICES=1"))
    pytest.skip(reason)
