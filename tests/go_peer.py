"""What the Go bus does to a deployment, reproduced with nats-py for the coexistence tests: its
durable pull consumer for node.up, and a stream whose limits a Go service raised."""

from __future__ import annotations

from typing import Any

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig

from gdc_worker import NATSConfig

#: The Go bus's durable for node.up: `gdc-consumer-<type>`, dots as dashes.
GO_DURABLE = "gdc-consumer-node-up"
#: The Go bus's MaxDeliver: the server stops redelivering after that many deliveries.
GO_MAX_DELIVER = 3

DAY = 24 * 3600.0
GIB = 1024**3
#: Limits a Go service raised the stream to.
RAISED: dict[str, Any] = {
    "max_age": 7 * DAY,
    "max_bytes": 10 * GIB,
    "max_msgs": 10_000_000,
    "duplicate_window": 600.0,
}
#: The same limits as gdc-worker's defaults set them (the Go bus's defaults, 5 min window).
DEFAULTS: dict[str, Any] = {
    "max_age": DAY,
    "max_bytes": GIB,
    "max_msgs": 1_000_000,
    "duplicate_window": 300.0,
}


async def add_go_consumer(js: JetStreamContext, config: NATSConfig, **changes: object) -> None:
    """The consumer the Go bus's SubscribeToEventType("node.up") creates (or a variant)."""
    consumer = ConsumerConfig(
        durable_name=GO_DURABLE,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.NEW,
        max_deliver=GO_MAX_DELIVER,
        ack_wait=30.0,
        filter_subject=config.subject_for("node.up"),
    )
    for name, value in changes.items():
        setattr(consumer, name, value)
    await js.add_consumer(config.stream_name, consumer)


async def add_raised_stream(js: JetStreamContext, config: NATSConfig) -> None:
    """The config's event stream, created with the `RAISED` limits."""
    await js.add_stream(
        StreamConfig(name=config.stream_name, subjects=list(config.stream_subjects), **RAISED)
    )


async def stream_limits(js: JetStreamContext, config: NATSConfig) -> dict[str, Any]:
    """The stream's values of the limits in `RAISED`."""
    current = (await js.stream_info(config.stream_name)).config
    return {name: getattr(current, name) for name in RAISED}
