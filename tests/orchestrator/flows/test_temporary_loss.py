"""Life-cycle flow on the embedded default (in-process transport, SQLite), every real part:
temporary loss: both suspended; found: auth released, sign revoked and reissued;
not found in time: revoked by a durable timer."""

from __future__ import annotations

from tests.e2e.lifecycle_stories import story_temporary_loss_found, story_temporary_loss_not_found
from tests.e2e.lifecycle_world import lifecycle_world


async def test_temporary_loss_then_found(tmp_path) -> None:
    async with lifecycle_world(tmp_path) as world:
        await story_temporary_loss_found(world)


async def test_temporary_loss_not_found_in_time_is_revoked(tmp_path) -> None:
    async with lifecycle_world(tmp_path, not_found_period_s=2.0) as world:
        await story_temporary_loss_not_found(world)
