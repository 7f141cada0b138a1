"""Life-cycle flow on the embedded default (in-process transport, SQLite), every real part:
failure from the call centre: both revoked, a repaired phone's stale applet removed."""

from __future__ import annotations

from tests.e2e.lifecycle_stories import story_failure
from tests.e2e.lifecycle_world import lifecycle_world


async def test_failure(tmp_path) -> None:
    async with lifecycle_world(tmp_path) as world:
        await story_failure(world)
