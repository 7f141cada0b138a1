"""Metrics: served over HTTP per process, depth gauges fed from the transport."""

from __future__ import annotations

import asyncio
import urllib.request

from infra import metrics
from infra.transport.base import Outgoing
from infra.transport.inprocess import InProcessTransport


async def test_queue_depth_gauges_follow_the_transport() -> None:
    transport = InProcessTransport()
    await transport.connect()
    await transport.declare_queue("metrics-q", ["m.#"])
    await transport.publish([Outgoing("m.x", b"{}", str(n)) for n in range(3)])
    await transport.park("metrics-q", Outgoing("m.x", b"{}", "p"), "test")
    watch = asyncio.create_task(metrics.watch_queue_depths(transport.queue_depths, every=0.01))
    await asyncio.sleep(0.05)
    watch.cancel()
    sample = metrics.REGISTRY.get_sample_value
    assert sample("jpki_queue_depth", {"queue": "metrics-q"}) == 3
    assert sample("jpki_parking_lot_messages", {"queue": "metrics-q"}) == 1


def test_metrics_server_serves_the_project_registry() -> None:
    metrics.SAGA_TRANSITIONS.labels("demo", "completed").inc()
    metrics.STEP_SECONDS.labels("demo", "reserve", "ok").observe(0.02)
    port = metrics.start_metrics_server(0, addr="127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:  # noqa: S310
        text = response.read().decode()
    assert 'jpki_saga_transitions_total{saga_type="demo",state="completed"}' in text
    bucket = 'le="0.025",outcome="ok",saga_type="demo",step="reserve"'
    assert f"jpki_saga_step_seconds_bucket{{{bucket}}} 1.0" in text
    assert "python_gc_objects_collected_total" not in text  # only the project's registry
