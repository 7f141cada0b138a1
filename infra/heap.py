"""The cyclic garbage collector in a long-running process.

A service builds most of what it keeps while it starts: modules, SQLAlchemy metadata,
keys and certificate templates, and in the embedded run the whole simulated fleet. Every
full collection walks all of it again (in a 300-phone embedded run, ~40 ms each time). Once
start-up is over, ``freeze_start_up_objects`` collects what start-up left as garbage and
moves everything else to the collector's permanent generation (``gc.freeze``): full
collections then walk only what came after. Objects frozen are never collected, which is
what start-up objects need anyway: they live as long as the process. A run inside a
longer-lived process (``jpki.run.run_stack`` under the tests) freezes for its own length
with ``start_up_objects_frozen``, and gives them back to the collector when it ends.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


def freeze_start_up_objects() -> None:
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def start_up_objects_frozen() -> Iterator[None]:
    freeze_start_up_objects()
    try:
        yield
    finally:
        gc.unfreeze()
