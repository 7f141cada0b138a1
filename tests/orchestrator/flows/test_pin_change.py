"""Life-cycle flow on the embedded default (in-process transport, SQLite), every real part:
PIN change: local, recorded; nothing else moves."""

from __future__ import annotations

from tests.e2e.lifecycle_stories import story_pin_change
from tests.e2e.lifecycle_world import lifecycle_world


async def test_pin_change(tmp_path) -> None:
    async with lifecycle_world(tmp_path) as world:
        await story_pin_change(world)
