"""Life-cycle flow on the embedded default (in-process transport, SQLite), every real part:
card cascade: card signing certificate revoked → phone signing certificate; card renewed → both."""

from __future__ import annotations

from tests.e2e.lifecycle_stories import story_card_cascade
from tests.e2e.lifecycle_world import lifecycle_world


async def test_card_cascade(tmp_path) -> None:
    async with lifecycle_world(tmp_path) as world:
        await story_card_cascade(world)
