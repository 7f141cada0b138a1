"""The event loop the long-running processes run on.

uvloop (libuv under asyncio's interface) where it is installed: its socket transports,
callbacks and timers cost less CPU than the standard selector loop's, and a process here
handles a few thousand socket reads and writes a second (AMQP frames, MQTT packets,
PostgreSQL round trips). In alternated runs of ``jpki bench issuance --services real``
it took the process's CPU per issuance from 25.1 to 23.4 ms (medians of three pairs); on
the embedded default, which opens no sockets, it changes nothing measurable. Without uvloop
(a platform it does not build on) the standard loop runs the same code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

try:
    import uvloop
except ImportError:  # pragma: no cover - every supported Linux and macOS has a wheel
    uvloop = None


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on uvloop's loop when available."""
    if uvloop is None:
        return asyncio.run(main)
    return uvloop.run(main)
