"""An app whose handler reports each call to the test by appending lines to a file.

- `GDC_TEST_OUT`: the file; each call appends `start <event id> <pid>`, then, once done,
  `done <event id> <pid>` (one `write` each, so lines of several processes do not mix).
- `GDC_TEST_SLEEP`: seconds each call takes (default 0).

`app` uses the default 30 s ack wait; `short_ack_wait` runs the same handler with a 2 s one, so
events a killed worker never settled come back quickly.
"""

from __future__ import annotations

import os

import anyio

from gdc_worker import App, Event

app = App("recorder")
short_ack_wait = App("recorder-short-ack")


def report(phase: str, event: Event) -> None:
    """Append `<phase> <event id> <pid>` to `$GDC_TEST_OUT`."""
    line = f"{phase} {event.id} {os.getpid()}\n".encode()
    fd = os.open(os.environ["GDC_TEST_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@app.on("node.up")
async def record(event: Event) -> None:
    """Report the start, take `$GDC_TEST_SLEEP` seconds, report the end."""
    report("start", event)
    await anyio.sleep(float(os.environ.get("GDC_TEST_SLEEP", "0")))
    report("done", event)


short_ack_wait.on("node.up", ack_wait=2.0)(record)
