"""The GDC pin workflow through the event bus, on an embedded nats-server.

api-gateway publishes pin.requested; the scheduler answers with plan.ready; the orchestrator
reports exec.progress, exec.completed and pin.completed. An auditor follows every `pin.*`
event. All five events share one trace id. Prints what each subscriber received; exits 0 once
the pin is completed (1 if it does not complete within 30 s).

    python examples/pin_workflow.py [--url nats://...]   # default: start an embedded server
"""

from __future__ import annotations

import argparse
import sys
import uuid

import anyio

from gdc_worker import (
    Assignment,
    Event,
    EventType,
    ExecProgressEvent,
    NATSConfig,
    NATSEventBus,
    NATSServer,
    PinRequestedEvent,
    PlanReadyEvent,
    new_exec_completed_event,
    new_exec_progress_event,
    new_pin_completed_event,
    new_pin_requested_event,
    new_plan_ready_event,
    parse_event_data,
)


def show(who: str, event: Event) -> None:
    print(f"{who:<13} got {event.type:<15} subject={event.subject:<32} trace={event.trace_id}")


async def run_workflow(config: NATSConfig) -> bool:
    """Wire the services on one bus, publish a pin request, wait for pin.completed."""
    completed = anyio.Event()
    async with await NATSEventBus.connect(config) as bus:

        async def scheduler(event: Event) -> None:
            show("scheduler", event)
            pin = parse_event_data(event, PinRequestedEvent)
            plan = PlanReadyEvent(
                plan_id=f"plan-{pin.cid}",
                cid=pin.cid,
                assignments=[
                    Assignment(node_id="node1", cluster_id="cluster1", zone_id="msk"),
                    Assignment(node_id="node2", cluster_id="cluster2", zone_id="nn"),
                ],
                estimated_cost=10.5,
            )
            await bus.publish_event(new_plan_ready_event("scheduler", plan, event.trace_id))

        async def orchestrator(event: Event) -> None:
            show("orchestrator", event)
            plan = parse_event_data(event, PlanReadyEvent)
            workflow = f"wf-{plan.plan_id}"
            step = ExecProgressEvent(
                workflow_id=workflow, step_id="pin", status="running", progress=0.5
            )
            trace = event.trace_id
            await bus.publish_event(new_exec_progress_event("orchestrator", step, trace))
            done = new_exec_completed_event("orchestrator", workflow, {"pinned": 2}, trace)
            await bus.publish_event(done)
            completed_pin = new_pin_completed_event(
                "orchestrator", plan.cid, plan.assignments, trace
            )
            await bus.publish_event(completed_pin)

        async def monitor(event: Event) -> None:
            show("monitor", event)

        async def auditor(event: Event) -> None:
            show("auditor", event)
            if event.type == EventType.PIN_COMPLETED:
                completed.set()

        await bus.subscribe_to_event_type(EventType.PIN_REQUESTED, scheduler)
        await bus.subscribe_to_event_type(EventType.PLAN_READY, orchestrator)
        await bus.subscribe_to_pattern("exec.*", monitor)
        await bus.subscribe_to_pattern("pin.*", auditor)

        request = PinRequestedEvent(
            cid="QmDemo" + uuid.uuid4().hex[:8],
            size=1024,
            policies=["rf-2"],
            priority=1,
            requested_by="demo",
        )
        trace_id = "trace-" + uuid.uuid4().hex[:12]
        print(f"api-gateway   publishes pin.requested for {request.cid} (trace {trace_id})")
        await bus.publish_event(new_pin_requested_event("api-gateway", request, trace_id))
        with anyio.move_on_after(30):
            await completed.wait()
    return completed.is_set()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing NATS server (default: start one)")
    args = parser.parse_args()
    if args.url:
        ok = anyio.run(run_workflow, NATSConfig.from_env(url=args.url))
    else:
        with NATSServer() as server:
            print(f"embedded nats-server with JetStream at {server.url}")
            ok = anyio.run(run_workflow, NATSConfig(url=server.url))
    print("pin workflow completed" if ok else "pin workflow did NOT complete within 30 s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
