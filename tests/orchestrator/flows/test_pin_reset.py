"""Life-cycle flow on the embedded default (in-process transport, SQLite), every real part:
PIN reset: card signature, fresh temporary PIN over SCP03, local setting; only the owner's card."""

from __future__ import annotations

from tests.e2e.lifecycle_stories import story_pin_reset
from tests.e2e.lifecycle_world import lifecycle_world


async def test_pin_reset(tmp_path) -> None:
    async with lifecycle_world(tmp_path) as world:
        await story_pin_reset(world)
