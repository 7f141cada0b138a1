"""Prometheus metrics every process exposes (``start_metrics_server``).

One registry for the project so a process serves exactly the metrics it uses, and tests
can read values back without the global default registry's process collectors.
Labels stay low-cardinality: message types, queue names, saga types and states, step
names — never message ids, device ids or saga ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PARKING_SUFFIX = ".parking"

REGISTRY = CollectorRegistry(auto_describe=True)

MESSAGES_IN = Counter(
    "jpki_messages_in_total",
    "Messages received by a consumer, by queue, type and outcome (ack, retry, park).",
    ["queue", "type", "outcome"],
    registry=REGISTRY,
)
MESSAGES_OUT = Counter(
    "jpki_messages_out_total",
    "Messages published (confirmed by the broker), by type.",
    ["type"],
    registry=REGISTRY,
)
REDELIVERIES = Counter(
    "jpki_redeliveries_total",
    "Deliveries that were not the first attempt (redelivered flag set), by queue.",
    ["queue"],
    registry=REGISTRY,
)
PARKED = Counter(
    "jpki_messages_parked_total",
    "Messages a consumer parked, by queue and reason kind.",
    ["queue", "reason"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "jpki_queue_depth",
    "Ready messages per service queue (refreshed from the transport's queue depths).",
    ["queue"],
    registry=REGISTRY,
)
PARKING_LOT_SIZE = Gauge(
    "jpki_parking_lot_messages",
    "Messages waiting in a queue's parking lot (refreshed from the transport).",
    ["queue"],
    registry=REGISTRY,
)
HANDLER_SECONDS = Histogram(
    "jpki_handler_seconds",
    "Time a message handler took, by queue and type.",
    ["queue", "type"],
    registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SAGAS = Gauge(
    "jpki_sagas",
    "Sagas by type and state (set by the saga engine from its store).",
    ["saga_type", "state"],
    registry=REGISTRY,
)
SAGA_TRANSITIONS = Counter(
    "jpki_saga_transitions_total",
    "Saga state transitions, by saga type and the state entered.",
    ["saga_type", "state"],
    registry=REGISTRY,
)
STEP_SECONDS = Histogram(
    "jpki_saga_step_seconds",
    "Saga step latency from command sent to reply handled, by saga type, step and outcome.",
    ["saga_type", "step", "outcome"],
    registry=REGISTRY,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
GATEWAY_FORWARDED = Counter(
    "jpki_gateway_forwarded_total",
    "Messages the MQTT gateway bridged, by direction (up = phone to AMQP, down = to phone).",
    ["direction"],
    registry=REGISTRY,
)


def update_queue_depths(depths: Mapping[str, int]) -> None:
    """Refresh the depth and parking-lot gauges from ``Transport.queue_depths()``."""
    for queue, depth in depths.items():
        if queue.endswith(PARKING_SUFFIX):
            PARKING_LOT_SIZE.labels(queue[: -len(PARKING_SUFFIX)]).set(depth)
        else:
            QUEUE_DEPTH.labels(queue).set(depth)


async def watch_queue_depths(
    queue_depths: Callable[[], Awaitable[Mapping[str, int]]], every: float = 15.0
) -> None:
    """Refresh the depth gauges from ``Transport.queue_depths`` until cancelled."""
    while True:
        try:
            update_queue_depths(await queue_depths())
        except Exception as exc:  # a broker hiccup must not end the watch
            structlog.get_logger(__name__).warning(
                "metrics.queue_depths_failed", error=type(exc).__name__
            )
        await asyncio.sleep(every)


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> int:  # noqa: S104 - scraped from outside
    """Serve ``/metrics`` for this process on ``port`` (0 picks a free one); returns the port."""
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    return int(server.server_address[1])
