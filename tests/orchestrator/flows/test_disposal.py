"""Life-cycle flow on the embedded default (in-process transport, SQLite), every real part:
disposal confirmed with the phone signing password: both revoked, applet deleted."""

from __future__ import annotations

from tests.e2e.lifecycle_stories import story_disposal
from tests.e2e.lifecycle_world import lifecycle_world


async def test_disposal(tmp_path) -> None:
    async with lifecycle_world(tmp_path) as world:
        await story_disposal(world)
