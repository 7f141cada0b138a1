"""Life-cycle flow on the embedded default (in-process transport, SQLite), every real part:
reissue on the same SE: new keys and certificates, old ones superseded."""

from __future__ import annotations

from tests.e2e.lifecycle_stories import story_reissue
from tests.e2e.lifecycle_world import lifecycle_world


async def test_reissue(tmp_path) -> None:
    async with lifecycle_world(tmp_path) as world:
        await story_reissue(world)
