"""Life-cycle flow on the embedded default (in-process transport, SQLite), every real part:
model change: issue on the new phone, old one revoked, old applet deleted when next online."""

from __future__ import annotations

from tests.e2e.lifecycle_stories import story_model_change
from tests.e2e.lifecycle_world import lifecycle_world


async def test_model_change(tmp_path) -> None:
    async with lifecycle_world(tmp_path) as world:
        await story_model_change(world)
