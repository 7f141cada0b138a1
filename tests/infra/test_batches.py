"""What arrives while a batch runs forms the next batch, up to the batch size."""

from __future__ import annotations

import asyncio

from infra.batches import Batches


async def test_what_arrives_during_a_batch_is_the_next_batch() -> None:
    seen: list[list[int]] = []
    release = asyncio.Event()

    async def run(batch: list[int]) -> None:
        seen.append(batch)
        if len(seen) == 1:
            await release.wait()  # the first batch is slow: more arrives meanwhile

    batches: Batches[int] = Batches(run, batch_size=3, name="test")
    batches.start()
    try:
        batches.put(0)
        await asyncio.sleep(0)
        batches.put_many([1, 2, 3, 4])
        batches.put(5)
        release.set()
        for _ in range(20):
            await asyncio.sleep(0)
        assert seen == [[0], [1, 2, 3], [4, 5]]
    finally:
        await batches.stop()
