"""Testing the example services as a project of your own would (`pytest examples`).

Nothing to register: installing gdc-worker gives pytest `TestApp` (in memory, no server) and
the real-server fixtures (`nats_server`, `nats_config`, `event_bus`), on asyncio.
"""

from __future__ import annotations

import anyio
import pytest

from examples import orchestrator, scheduler
from gdc_worker import (
    Event,
    NATSConfig,
    NATSEventBus,
    PinRequestedEvent,
    PlanReadyEvent,
    Worker,
    new_pin_requested_event,
    parse_event_data,
)
from gdc_worker.testing import TestApp

pytestmark = pytest.mark.anyio


def pin(cid: str, *policies: str) -> Event:
    return new_pin_requested_event(
        "test", PinRequestedEvent(cid=cid, policies=list(policies)), trace_id="trace-1"
    )


async def test_a_pin_is_planned_on_as_many_zones_as_its_replication_factor() -> None:
    """Given the scheduler, when a pin with rf-3 is requested,
    then it publishes one plan.ready placing the pin on three distinct zones."""
    async with TestApp(scheduler.app) as t:
        await t.publish(pin("cid-1", "rf-3"))

    (ready,) = t.published
    plan = parse_event_data(ready, PlanReadyEvent)
    assert (ready.type, plan.cid) == ("plan.ready", "cid-1")
    assert len({a.zone_id for a in plan.assignments}) == 3


async def test_a_pin_needing_more_zones_than_there_are_fails_to_plan() -> None:
    """Given the scheduler, when a pin with rf-5 is requested (three zones exist),
    then it publishes plan.failed, and nothing is dead-lettered."""
    async with TestApp(scheduler.app) as t:
        await t.publish(pin("cid-2", "rf-5"))

    assert [e.type for e in t.published] == ["plan.failed"]
    assert t.dead_letters == []


async def test_a_pin_without_a_cid_is_rejected_into_the_dead_letters() -> None:
    """Given the scheduler, when a pin without a cid is requested,
    then it is dead-lettered at once, on its first delivery, naming why;
    join(fail_fast=True) would raise that Reject inside the test."""
    async with TestApp(scheduler.app) as t:
        await t.publish(pin(""))
        await t.join()

    (record,) = t.dead_letters
    assert (record.reason, record.deliveries) == ("rejected: pin.requested without a cid", 1)
    assert (record.consumer, record.event_type) == ("scheduler-plan_pin", "pin.requested")


async def test_scheduler_and_orchestrator_complete_a_pin_together() -> None:
    """Given the scheduler and the orchestrator under one test app,
    when a pin is requested, then the plan reaches the orchestrator, which reports progress
    and completes the pin, all on the request's trace id."""
    async with TestApp(scheduler.app, orchestrator.app) as t:
        await t.publish(pin("cid-3", "rf-2"))
        await t.join(fail_fast=True)

    assert [e.type for e in t.published] == [
        "plan.ready",
        "exec.progress",
        "exec.progress",
        "exec.completed",
        "pin.completed",
    ]
    assert {e.trace_id for e in t.published} == {"trace-1"}


async def test_on_a_real_server_a_requested_pin_gets_a_plan(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given the scheduler run by a real worker on a test stream of its own,
    when a pin is requested through the bus, then a plan.ready for it arrives."""
    plans: list[Event] = []
    arrived = anyio.Event()

    async def collect(event: Event) -> None:
        plans.append(event)
        arrived.set()

    await event_bus.subscribe_to_event_type("plan.ready", collect)
    worker = Worker(scheduler.app, config=nats_config, grace=2.0)
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        await event_bus.publish_event(pin("cid-4", "rf-2"))
        with anyio.fail_after(10):
            await arrived.wait()
        worker.stop()

    assert [parse_event_data(e, PlanReadyEvent).cid for e in plans] == ["cid-4"]
