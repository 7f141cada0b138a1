"""Message and application ids: UUIDv7's layout (RFC 9562 §5.7), time-ordered."""

from __future__ import annotations

import time
import uuid

from protocol.envelope import new_message_id, time_ordered_id


def test_an_id_is_a_version_7_uuid_carrying_its_creation_time() -> None:
    before = time.time_ns() // 1_000_000
    made = time_ordered_id()
    after = time.time_ns() // 1_000_000
    assert len(made) == 32 and int(made, 16) >= 0
    parsed = uuid.UUID(hex=made)
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert before <= int(made[:12], 16) <= after  # the first 48 bits: Unix time in ms


def test_ids_made_in_later_milliseconds_sort_after_and_none_repeat() -> None:
    first = [time_ordered_id() for _ in range(1000)]
    time.sleep(0.002)
    second = [new_message_id() for _ in range(1000)]
    assert max(first) < min(second)
    assert len(set(first + second)) == 2000
