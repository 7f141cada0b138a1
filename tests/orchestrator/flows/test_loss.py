"""Life-cycle flow on the embedded default (in-process transport, SQLite), every real part:
loss from the call centre (authenticated): both revoked, applet deleted on reconnection."""

from __future__ import annotations

from tests.e2e.lifecycle_stories import story_loss
from tests.e2e.lifecycle_world import lifecycle_world


async def test_loss(tmp_path) -> None:
    async with lifecycle_world(tmp_path) as world:
        await story_loss(world)
