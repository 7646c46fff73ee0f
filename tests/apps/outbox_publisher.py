"""A publisher that keeps working while NATS is down: `python -m tests.apps.outbox_publisher`.

It publishes `$GDC_TEST_COUNT` node.up events through the outbox (`GDC_NATS_*`, with
`GDC_NATS_OUTBOX_PATH`), pausing `$GDC_TEST_PAUSE` seconds after each, and appends the number
of each one published to `$GDC_TEST_OUT`; then it waits until the outbox is empty. An event's
id derives from its number, so a restarted publisher sends the same events again, as a real
one retries with the same ids.
"""

from __future__ import annotations

import os
import uuid

import anyio

from gdc_worker import NATSConfig, NATSEventBus, new_node_up_event

_NAMESPACE = uuid.UUID("6f1d0d62-4b8e-4a55-9d0e-0f3b7f1c2a11")


def event_id(n: int) -> str:
    """The id of the publisher's event number `n`."""
    return str(uuid.uuid5(_NAMESPACE, str(n)))


async def main() -> None:
    """Publish the events, then wait for the outbox to drain."""
    count = int(os.environ["GDC_TEST_COUNT"])
    pause = float(os.environ.get("GDC_TEST_PAUSE", "0"))
    fd = os.open(os.environ["GDC_TEST_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        async with await NATSEventBus.connect(NATSConfig.from_env()) as bus:
            for n in range(count):
                event = new_node_up_event("outbox-publisher", f"node-{n}")
                event.id = event_id(n)
                await bus.publish_event(event)
                os.write(fd, f"{n}\n".encode())
                await anyio.sleep(pause)
            await bus.wait_outbox_empty()
    finally:
        os.close(fd)


if __name__ == "__main__":
    anyio.run(main)
