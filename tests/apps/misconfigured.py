"""An app whose handlers have the settings `gdc-worker check APP` warns about, and one that
is fine; the handlers themselves do nothing.

- `slow`: a 60 s timeout, over its 30 s ack_wait;
- `eager`: 6 backoff steps for max_deliver 3, which redelivers twice;
- `narrow`: max_ack_pending 8 at concurrency 4, below 4 replicas x 4;
- `fine`: the defaults (a test may create its consumer `ops-fine` otherwise).
"""

from __future__ import annotations

from gdc_worker import App, Event

app = App("ops")


@app.on("node.up", timeout=60.0)
async def slow(event: Event) -> None:
    """Do nothing: only the settings matter, here and below."""


@app.on("node.down", max_deliver=3, backoff=(1, 2, 3, 4, 5, 6))
async def eager(event: Event) -> None: ...


@app.on("zone.up", concurrency=4, max_ack_pending=8)
async def narrow(event: Event) -> None: ...


@app.on("zone.down")
async def fine(event: Event) -> None: ...
