"""The app the scaling benchmark runs with `gdc-worker run bench.apps:app --processes N`.

Its stream comes from the GDC_NATS_* environment; GDC_BENCH_WORK_MS is the CPU each event burns.
"""

from __future__ import annotations

import os
import time

from gdc_worker import App, Event

app = App("bench-scale")
WORK_S = float(os.environ.get("GDC_BENCH_WORK_MS", "0")) / 1000


@app.on(">", durable="bench-scale")
async def handle(event: Event) -> None:
    """Burn WORK_S of CPU (a busy loop: the GIL is held, as in real CPU-bound work)."""
    if WORK_S:
        until = time.perf_counter() + WORK_S
        while time.perf_counter() < until:
            pass
