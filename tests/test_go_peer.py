"""Sharing a stream and consumers with the Go bus: what a Go peer sets up, reproduced with
nats-py exactly as the official nats.go client leaves it on the server."""

from __future__ import annotations

import logging

import pytest
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, DeliverPolicy

from gdc_worker import (
    App,
    ConfigError,
    Event,
    NATSConfig,
    NATSEventBus,
    SubscriptionError,
)
from gdc_worker.subjects import safe_name
from tests.go_peer import (
    DEFAULTS,
    GIB,
    GO_DURABLE,
    RAISED,
    add_go_consumer,
    add_raised_stream,
    stream_limits,
)
from tests.recording import Recording
from tests.support import consumer_info, dead_letters, node_up, running, worker_for

pytestmark = pytest.mark.anyio


class Collector(Recording[Event]):
    """A handler that records the events it gets."""

    def __init__(self) -> None:
        super().__init__(lambda event: event)

    async def __call__(self, event: Event) -> None:
        self.note(event)


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and text in r.getMessage()
    ]


@pytest.mark.parametrize(
    ("pattern", "name"),
    [("node.up", "node-up"), ("pin.*", "pin-star"), (">", "gt"), ("exec.>", "exec-gt")],
)
def test_safe_names_are_the_go_buses(pattern: str, name: str) -> None:
    """Given an event type or pattern, its consumer name is the Go bus's: '.' as '-', '*' as
    'star', '>' as 'gt'."""
    assert safe_name(pattern) == name


# -- consumers --------------------------------------------------------------------------------


async def test_a_subscription_binds_the_go_peers_consumer_as_it_is(
    event_bus: NATSEventBus,
    jetstream: JetStreamContext,
    nats_config: NATSConfig,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Given the Go bus's consumer for node.up (deliver new, max_deliver 3),
    when a gdc-worker bus subscribes to node.up with its default durable,
    then it binds that consumer (no `deliver policy can not be updated`), logs one warning
    naming deliver_policy and max_deliver, gets the next event, and the consumer keeps its
    configuration."""
    await add_go_consumer(jetstream, nats_config)
    collector = Collector()

    with caplog.at_level(logging.WARNING, logger="gdc_worker"):
        await event_bus.subscribe_to_event_type("node.up", collector)
    event = node_up()
    await event_bus.publish_event(event)
    await collector.wait_for_event(event)

    [warning] = warnings_about(caplog, GO_DURABLE)
    assert "deliver_policy new (ours all)" in warning
    assert "max_deliver 3 (ours unlimited)" in warning
    assert "ack_wait" not in warning
    info = await consumer_info(jetstream, nats_config.stream_name, GO_DURABLE)
    assert (info.config.deliver_policy, info.config.max_deliver) == (DeliverPolicy.NEW, 3)


async def test_an_event_failing_on_the_go_consumer_is_dead_lettered_on_its_third_delivery(
    event_bus: NATSEventBus, jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given the Go bus's consumer (max_deliver 3 on the server),
    when a worker whose handler (max_deliver 5) always fails binds to it,
    then the event is dead-lettered on the server's 3rd delivery, not stranded: the handler
    ran 3 times and nothing is left pending on the consumer."""
    await add_go_consumer(jetstream, nats_config)
    app = App("svc", nats_config)
    calls: list[int] = []

    @app.on("node.up", durable=GO_DURABLE, max_deliver=5, retry=None, backoff=(0.01,))
    async def always_fails(event: Event) -> None:
        calls.append(1)
        raise RuntimeError("down")

    async with running(worker_for(app, nats_config)):
        event = node_up()
        await event_bus.publish_event(event)
        [record] = await dead_letters(event_bus)
        info = await consumer_info(jetstream, nats_config.stream_name, GO_DURABLE)

    assert (record.event, record.deliveries, record.consumer) == (event, 3, GO_DURABLE)
    assert "delivery 3 of 3" in record.reason
    assert len(calls) == 3
    assert (info.num_ack_pending, info.num_redelivered) == (0, 0)


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"deliver_subject": "push.node.up"}, "push consumer"),
        ({"filter_subject": "node.down"}, ""),
        ({"ack_policy": AckPolicy.NONE}, "ack policy is 'none'"),
    ],
)
async def test_a_consumer_that_cannot_serve_is_refused_with_a_clear_error(
    event_bus: NATSEventBus,
    jetstream: JetStreamContext,
    nats_config: NATSConfig,
    changes: dict[str, object],
    why: str,
) -> None:
    """Given a consumer of the default durable's name that is a push consumer, filters on
    another subject, or takes no acks,
    when the bus subscribes to node.up,
    then it raises SubscriptionError naming the consumer and why, and leaves it as it was."""
    if "filter_subject" in changes:  # another type of the test's own stream
        changes = {"filter_subject": nats_config.subject_for("node.down")}
        why = f"it filters on {nats_config.subject_for('node.down')}, not"
    await add_go_consumer(jetstream, nats_config, **changes)

    with pytest.raises(SubscriptionError, match=GO_DURABLE) as raised:
        await event_bus.subscribe_to_event_type("node.up", Collector())

    assert why in str(raised.value)
    info = await jetstream.consumer_info(nats_config.stream_name, GO_DURABLE)
    assert info.config.deliver_policy == DeliverPolicy.NEW


# -- the stream -------------------------------------------------------------------------------


def defaults(nats_config: NATSConfig, stream_setup: str) -> NATSConfig:
    """The test's stream with the default limits (24 h, 1 GiB, 1 M, 5 min)."""
    return nats_config.replace(max_bytes=GIB, stream_setup=stream_setup)


async def test_create_keeps_a_go_peers_raised_limits_with_one_warning(
    jetstream: JetStreamContext, nats_config: NATSConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """Given a stream a Go service raised to 7 d / 10 GiB / 10 M / 10 min,
    when a bus on the default limits connects with stream_setup "create" (the default),
    then the stream keeps the server's limits, and one warning names each differing field,
    ours against theirs."""
    await add_raised_stream(jetstream, nats_config)

    with caplog.at_level(logging.WARNING, logger="gdc_worker"):
        async with await NATSEventBus.connect(defaults(nats_config, "create")):
            pass

    assert await stream_limits(jetstream, nats_config) == RAISED
    [warning] = warnings_about(caplog, nats_config.stream_name)
    for expected in (
        "max_age 1d (ours) vs 7d (server)",
        "max_bytes 1 GiB (ours) vs 10 GiB (server)",
        "max_msgs 1,000,000 (ours) vs 10,000,000 (server)",
        "duplicate_window 5min (ours) vs 10min (server)",
    ):
        assert expected in warning
    assert "replicas" not in warning


async def test_update_applies_the_configured_limits_as_the_go_bus_does(
    jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given a stream with raised limits,
    when a bus connects with stream_setup "update",
    then the stream has the configured limits."""
    await add_raised_stream(jetstream, nats_config)
    config = defaults(nats_config, "update")

    async with await NATSEventBus.connect(config):
        pass

    assert await stream_limits(jetstream, nats_config) == DEFAULTS


async def test_none_never_touches_the_stream(
    jetstream: JetStreamContext, nats_config: NATSConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """Given a stream with raised limits,
    when a bus connects with stream_setup "none",
    then the stream keeps them, without a warning."""
    await add_raised_stream(jetstream, nats_config)

    with caplog.at_level(logging.WARNING, logger="gdc_worker"):
        async with await NATSEventBus.connect(defaults(nats_config, "none")):
            pass

    assert await stream_limits(jetstream, nats_config) == RAISED
    assert warnings_about(caplog, nats_config.stream_name) == []


async def test_none_fails_clearly_when_the_stream_is_missing(
    jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given no event stream,
    when a bus connects with stream_setup "none",
    then it raises ConfigError naming the stream and the setting, and creates nothing."""
    with pytest.raises(ConfigError, match=rf"stream {nats_config.stream_name} does not exist"):
        await NATSEventBus.connect(nats_config.replace(stream_setup="none"))

    names = await jetstream.streams_info()
    assert nats_config.stream_name not in [s.config.name for s in names]


async def test_create_creates_a_missing_stream_with_the_configured_limits(
    jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given no event stream,
    when a bus connects with stream_setup "create",
    then the stream exists with the configured limits."""
    async with await NATSEventBus.connect(defaults(nats_config, "create")):
        pass

    assert (await stream_limits(jetstream, nats_config))["max_bytes"] == GIB
