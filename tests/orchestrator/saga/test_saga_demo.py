"""The demo saga end to end on both backends: completion, compensation in reverse,
timeouts with retries, duplicates, deadlines, pause and resume."""

from __future__ import annotations

import asyncio
import collections

from infra.metrics import REGISTRY
from orchestrator.demo.flow import OrderData, demo_flow
from orchestrator.saga import Retry

STEPS = ["reserve", "charge", "ship"]


def events(timeline):
    return [(row.event, row.step) for row in timeline]


def completed_metric() -> float:
    labels = {"saga_type": "demo.order", "state": "completed"}
    return REGISTRY.get_sample_value("jpki_saga_transitions_total", labels) or 0.0


async def test_demo_saga_completes(make_stack):
    stack = await make_stack()
    completed_before = completed_metric()
    datas = [OrderData(order_id=f"o{i}") for i in range(20)]
    ids = await stack.engine.start_sagas(stack.flow, datas)
    views = await stack.wait_terminal(ids)
    assert completed_metric() - completed_before == 20
    await stack.engine.refresh_saga_gauge()
    gauge = {"saga_type": "demo.order", "state": "completed"}
    assert REGISTRY.get_sample_value("jpki_sagas", gauge) == 20
    assert {v.status for v in views.values()} == {"completed"}
    assert all(v.data.done == STEPS for v in views.values())
    effects = await stack.effects()
    for saga_id in ids:
        assert [(s, a) for sid, s, a in effects if sid == saga_id] == [(s, "do") for s in STEPS]
    timeline = await stack.engine.timeline(ids[0])
    assert events(timeline) == [
        ("started", None),
        ("sent", "reserve"), ("done", "reserve"),
        ("sent", "charge"), ("done", "charge"),
        ("sent", "ship"), ("done", "ship"),
        ("completed", None),
    ]
    assert all(b.at >= a.at for a, b in zip(timeline, timeline[1:]))


async def test_rejected_step_compensates_earlier_steps_in_reverse(make_stack):
    stack = await make_stack()
    saga_id = await stack.engine.start_saga(stack.flow, OrderData(order_id="r", reject="ship"))
    view = (await stack.wait_terminal([saga_id]))[saga_id]
    assert view.status == "compensated"
    assert view.reason == "ship rejected: rejected_on_request"
    # the participant's own record: done in order, undone in reverse, ship never applied
    assert [(s, a) for sid, s, a in await stack.effects() if sid == saga_id] == [
        ("reserve", "do"), ("charge", "do"), ("charge", "undo"), ("reserve", "undo"),
    ]
    assert events(await stack.engine.timeline(saga_id)) == [
        ("started", None),
        ("sent", "reserve"), ("done", "reserve"),
        ("sent", "charge"), ("done", "charge"),
        ("sent", "ship"), ("rejected", "ship"),
        ("compensating", None),
        ("sent", "charge"), ("undone", "charge"),
        ("sent", "reserve"), ("undone", "reserve"),
        ("compensated", None),
    ]


async def test_step_timeout_retries_then_compensates(make_stack):
    flow = demo_flow(timeout=0.3, retry=Retry(max_attempts=2, initial=0.05, jitter=0.0))
    stack = await make_stack(flow=flow)
    saga_id = await stack.engine.start_saga(flow, OrderData(order_id="t", stall="charge"))
    view = (await stack.wait_terminal([saga_id], within=20))[saga_id]
    assert view.status == "compensated"
    assert view.reason == "charge gave up after 2 attempts: timeout"
    timeline = await stack.engine.timeline(saga_id)
    charge = [(row.event, row.attempt) for row in timeline if row.step == "charge"]
    assert charge[:5] == [("sent", 1), ("timeout", 1), ("retry_scheduled", 1), ("sent", 2),
                          ("timeout", 2)]
    # its outcome was unknown, so charge is compensated too (the participant had nothing
    # to undo and left a tombstone), then reserve
    assert charge[5:] == [("sent", 1), ("undone", 1)]
    assert [(s, a) for sid, s, a in await stack.effects() if sid == saga_id] == [
        ("reserve", "do"), ("charge", "cancel"), ("reserve", "undo"),
    ]


async def test_every_message_delivered_twice_every_effect_once(make_stack):
    stack = await make_stack(duplicate=True)
    datas = [OrderData(order_id=f"d{i}", reject="charge" if i % 5 == 0 else None)
             for i in range(40)]
    ids = await stack.engine.start_sagas(stack.flow, datas)
    views = await stack.wait_terminal(ids)
    assert sum(v.status == "completed" for v in views.values()) == 32
    assert sum(v.status == "compensated" for v in views.values()) == 8
    effects = collections.Counter(await stack.effects())
    assert max(effects.values()) == 1, [e for e, n in effects.items() if n > 1]
    assert len(effects) == 32 * 3 + 8 * 2  # completed: 3 dos; compensated: reserve do+undo
    # the duplicates did arrive, and the inboxes caught them
    assert stack.participant.consumer.duplicates >= 40
    assert stack.engine.consumer.duplicates >= 40


async def test_saga_deadline_compensates(make_stack):
    flow = demo_flow(timeout=30)
    flow.deadline = 0.5
    stack = await make_stack(flow=flow)
    saga_id = await stack.engine.start_saga(flow, OrderData(order_id="late", stall="ship"))
    view = (await stack.wait_terminal([saga_id], within=20))[saga_id]
    assert view.status == "compensated"
    assert view.reason == "saga deadline exceeded"
    assert [(s, a) for sid, s, a in await stack.effects() if sid == saga_id] == [
        ("reserve", "do"), ("charge", "do"), ("ship", "cancel"), ("charge", "undo"),
        ("reserve", "undo"),
    ]


async def test_pause_holds_and_resume_continues(make_stack):
    stack = await make_stack()
    saga_id = await stack.engine.start_saga(stack.flow, OrderData(order_id="p"))
    assert await stack.engine.pause(saga_id, "operator: checking the order")
    for _ in range(200):
        view = await stack.engine.get(saga_id)
        if view.waiting == "resume":
            break
        await asyncio.sleep(0.05)
    assert view.status == "running" and view.paused and view.waiting == "resume"
    await asyncio.sleep(0.3)  # nothing moves while paused
    held = await stack.engine.get(saga_id)
    assert held.version == view.version and held.status == "running"
    applied = [s for sid, s, a in await stack.effects() if sid == saga_id]
    assert len(applied) < 3
    assert await stack.engine.resume(saga_id)
    view = (await stack.wait_terminal([saga_id]))[saga_id]
    assert view.status == "completed" and not view.paused
    kinds = [e for e, _ in events(await stack.engine.timeline(saga_id))]
    assert kinds.index("paused") < kinds.index("held") < kinds.index("resumed")
    assert not await stack.engine.pause(saga_id, "too late")  # terminal sagas stay put
