"""Freezing start-up objects: full collections skip them while frozen, later garbage is
still collected, and a run inside a longer process gives them back when it ends."""

from __future__ import annotations

import gc
import weakref

from infra.heap import start_up_objects_frozen


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_frozen_objects_wait_for_the_end_of_the_run_and_new_garbage_does_not() -> None:
    kept_at_start_up = _Node()
    from_start_up = weakref.ref(kept_at_start_up)
    with start_up_objects_frozen():
        assert gc.get_freeze_count() > 0
        del kept_at_start_up  # start-up garbage now, but frozen: a collection skips it
        made_during_the_run = weakref.ref(_Node())
        gc.collect()
        assert made_during_the_run() is None
        assert from_start_up() is not None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert from_start_up() is None
