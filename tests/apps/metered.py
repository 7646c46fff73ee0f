"""An app whose handler's outcome depends on the event's subject, for the metrics tests.

- `ok`: handled, and publishes one `node.down` event through `ctx.publish`;
- `flaky`: fails its first attempt, then succeeds in process;
- `bad`: rejected (`Reject`), dead-lettered at once;
- `broken`: always fails: 2 attempts per delivery, 2 deliveries, then dead-lettered;
- `slow`: runs until the file its data names (`until`) exists: a call in flight.
"""

from __future__ import annotations

import anyio

from gdc_worker import App, Context, Event, Reject, RetryPolicy

app = App("metered")
_failed_once: set[str] = set()


@app.on(
    "node.up",
    retry=RetryPolicy.attempts(2, initial=0.001, maximum=0.001),
    max_deliver=2,
    backoff=(0.05,),
)
async def judge(event: Event, ctx: Context) -> None:
    """Succeed, fail once, reject or fail for good, as the subject says."""
    if event.subject == "slow":
        while not await anyio.Path((event.data or {})["until"]).exists():
            await anyio.sleep(0.01)
    if event.subject == "bad":
        raise Reject("bad node")
    if event.subject == "broken":
        raise RuntimeError("broken node")
    if event.subject == "flaky" and event.id not in _failed_once:
        _failed_once.add(event.id)
        raise RuntimeError("flaky node")
    if event.subject == "ok":
        await ctx.publish(Event.new("node.down", "metered", event.subject, {}))
