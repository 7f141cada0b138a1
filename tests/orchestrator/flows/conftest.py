"""Life-cycle flow tests: the whole stack runs in the test process, so warnings only."""

from __future__ import annotations

import sys

import pytest

from infra.logging import configure_logging


@pytest.fixture(autouse=True)
def quiet_logs() -> None:
    configure_logging("lifecycle-tests", level="WARNING", pretty=False, stream=sys.stderr)
