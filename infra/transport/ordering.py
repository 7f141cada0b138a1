"""Per-key ordering for pipelined consumers (one device's messages stay in order)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class PerKeyOrder:
    """Lets work for one key run one at a time, in the order it asked for its turn, while
    different keys run concurrently.

    The turn is taken synchronously when ``turn`` is entered, before anything awaits, so
    tasks started in delivery order are served in delivery order.
    """

    def __init__(self) -> None:
        self._tails: dict[str, asyncio.Future[None]] = {}

    @asynccontextmanager
    async def turn(self, key: str) -> AsyncIterator[None]:
        previous = self._tails.get(key)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tails[key] = done
        try:
            if previous is not None:
                await asyncio.shield(previous)
            yield
        finally:
            done.set_result(None)
            if self._tails.get(key) is done:
                del self._tails[key]

    def __len__(self) -> int:
        """Keys with work running or waiting."""
        return len(self._tails)
