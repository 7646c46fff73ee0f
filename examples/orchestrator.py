"""The orchestrator service: plan.ready -> exec.progress per replica -> exec.completed and
pin.completed.

    gdc-worker run examples.orchestrator:app
"""

from __future__ import annotations

from gdc_worker import (
    App,
    Context,
    ExecProgressEvent,
    PlanReadyEvent,
    new_exec_completed_event,
    new_exec_progress_event,
    new_pin_completed_event,
)

app = App("orchestrator")


@app.on("plan.ready")
async def execute_plan(plan: PlanReadyEvent, ctx: Context) -> None:
    """Pin on each assigned node, reporting progress, then report the pin complete."""
    workflow = f"wf-{plan.plan_id}"
    total = len(plan.assignments)
    for n, assignment in enumerate(plan.assignments, start=1):
        step = ExecProgressEvent(
            workflow_id=workflow,
            step_id=f"pin-{assignment.node_id}",
            status="running" if n < total else "done",
            progress=n / total,
            message=f"pinned {plan.cid} on {assignment.node_id}",
        )
        await ctx.publish(new_exec_progress_event(app.name, step))
    result = {"pinned": total, "cid": plan.cid}
    await ctx.publish(new_exec_completed_event(app.name, workflow, result))
    await ctx.publish(new_pin_completed_event(app.name, plan.cid, plan.assignments))
    ctx.log.info("pin %s completed on %d nodes", plan.cid, total)
