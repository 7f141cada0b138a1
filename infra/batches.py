"""One task that takes what has arrived since its last batch and runs it as one batch.

The services' consumers use it for group commit: deliveries return to the transport
unsettled, wait here, and are settled by the batch that commits them, so a batch is
whatever arrived while the previous one ran (up to ``batch_size``) and no task or future
waits per delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")


class Batches(Generic[Item]):
    def __init__(self, run_batch: Callable[[list[Item]], Awaitable[None]], *,
                 batch_size: int, name: str) -> None:
        self._run_batch = run_batch
        self._batch_size = batch_size
        self._name = name
        self._pending: list[Item] = []
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def put(self, item: Item) -> None:
        self._pending.append(item)
        self._arrived.set()

    def put_many(self, items: list[Item]) -> None:
        if items:
            self._pending.extend(items)
            self._arrived.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._work(), name=self._name)

    async def stop(self) -> None:
        """Stop after the batch in hand; what still waits is dropped (its deliveries were
        given back to the queue by the cancelled subscription)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pending.clear()

    async def _work(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._pending:
                batch = self._pending[: self._batch_size]
                del self._pending[: len(batch)]
                await self._run_batch(batch)
