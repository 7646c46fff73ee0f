"""The scheduler service: pin.requested -> plan.ready (or plan.failed when it cannot place it).

gdc-worker run examples.scheduler:app
"""

from __future__ import annotations

from gdc_worker import (
    App,
    Assignment,
    Context,
    PinRequestedEvent,
    PlanReadyEvent,
    Reject,
    new_plan_failed_event,
    new_plan_ready_event,
)

app = App("scheduler")

#: The nodes this toy scheduler places replicas on, one per zone.
NODES = [
    Assignment(node_id="node1", cluster_id="cluster1", zone_id="msk"),
    Assignment(node_id="node2", cluster_id="cluster2", zone_id="nn"),
    Assignment(node_id="node3", cluster_id="cluster3", zone_id="spb"),
]


def replication_factor(pin: PinRequestedEvent) -> int:
    """`rf-N` among the policies, 2 by default."""
    for policy in pin.policies:
        if policy.startswith("rf-") and policy[3:].isdigit():
            return int(policy[3:])
    return 2


@app.on("pin.requested")
async def plan_pin(pin: PinRequestedEvent, ctx: Context) -> None:
    """Place the pin's replicas on distinct zones, or say why it cannot be placed."""
    if not pin.cid:
        raise Reject("pin.requested without a cid")
    rf = replication_factor(pin)
    if rf > len(NODES):
        await ctx.publish(new_plan_failed_event(app.name, pin.cid, f"no {rf} zones for rf-{rf}"))
        return
    plan = PlanReadyEvent(
        plan_id=f"plan-{pin.cid}", cid=pin.cid, assignments=NODES[:rf], estimated_cost=1.5 * rf
    )
    ctx.log.info("planned %s on %d nodes", pin.cid, rf)
    await ctx.publish(new_plan_ready_event(app.name, plan))
