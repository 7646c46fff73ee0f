"""The dead-letter backstop against a real nats-server: what a Go consumer's MaxDeliver drops
ends up in the dead-letter stream, once."""

from __future__ import annotations

import logging

import msgspec
import nats.errors
import nats.js.errors
import pytest
from nats.js import JetStreamContext

from gdc_worker import (
    App,
    ConfigError,
    DeadLetterQueue,
    DeadLetterRecord,
    DeadLetterUnreadable,
    Event,
    NATSConfig,
    NATSEventBus,
    Worker,
)
from gdc_worker.backstop import ADVISORY_PREFIX, advisory_stream_name, backstop_durable
from tests.go_peer import GO_DURABLE, GO_MAX_DELIVER, add_go_consumer
from tests.recording import ARRIVAL_TIMEOUT
from tests.support import (
    consumer_info,
    dead_letters,
    eventually,
    node_up,
    running,
    worker_for,
)

pytestmark = pytest.mark.anyio

#: The Go services' default consumer name for node.up, and its server-side limit.


def unrelated_app(nats_config: NATSConfig) -> App:
    """An app whose only handler has nothing to do with node.up."""
    app = App("auditor", nats_config)

    @app.on("pin.requested", retry=None)
    async def audit(event: Event) -> None:
        pass

    return app


async def go_peer_drops(
    jetstream: JetStreamContext, nats_config: NATSConfig, bus: NATSEventBus, event: Event
) -> int:
    """Reproduce a Go service: a pull consumer with MaxDeliver 3 that naks `event` without delay
    on each delivery, and keeps pulling (as `Consume()` does), so the server gives up on it and
    publishes its max-deliveries advisory. Returns the event's stream sequence."""
    await add_go_consumer(jetstream, nats_config)
    sub = await jetstream.pull_subscribe_bind(GO_DURABLE, stream=nats_config.stream_name)
    seq = await bus.publish_event(event)
    for delivery in range(1, GO_MAX_DELIVER + 1):
        (msg,) = await sub.fetch(1, timeout=ARRIVAL_TIMEOUT)
        assert msg.metadata.num_delivered == delivery
        await msg.nak()
    with pytest.raises(nats.errors.TimeoutError):  # given up: nothing more comes
        await sub.fetch(1, timeout=0.5)
    await sub.unsubscribe()
    assert seq is not None, "no outbox: stored or raised"
    return seq


async def advisories_settled(
    jetstream: JetStreamContext, nats_config: NATSConfig, count: int
) -> None:
    """Wait until the backstop consumer has acked `count` advisories (fails after a timeout)."""
    info = await consumer_info(
        jetstream,
        advisory_stream_name(nats_config),
        backstop_durable(nats_config),
        until=lambda i: i.ack_floor is not None and i.ack_floor.consumer_seq >= count,
    )
    assert info.ack_floor is not None, info
    assert info.ack_floor.consumer_seq >= count, info
    assert (info.num_ack_pending, info.num_pending) == (0, 0), info


def assert_backstop_record(record: DeadLetterRecord, event: Event, seq: int) -> None:
    assert record.consumer == GO_DURABLE
    assert record.handler == "(server)"
    assert record.reason == (
        f"the server stopped redelivering after {GO_MAX_DELIVER} deliveries to {GO_DURABLE}"
    )
    assert record.deliveries == GO_MAX_DELIVER
    assert record.data == event.to_json()
    assert record.event_id == event.id
    assert record.stream_seq == seq
    assert record.error_type == ""


async def records(bus: NATSEventBus) -> list[DeadLetterRecord]:
    return [entry.record async for entry in DeadLetterQueue(bus).entries()]


async def test_a_message_a_go_consumer_drops_is_dead_lettered_once(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a worker of an app with an unrelated handler, and a Go service's consumer on
    node.up with MaxDeliver 3,
    when that consumer naks an event three times and the server gives up on it,
    then the dead-letter stream has one record of it for that consumer, with the reason, its
    original bytes and 3 deliveries; and when the same advisory comes again, there is still
    one."""
    async with running(worker_for(unrelated_app(nats_config), nats_config)):
        event = node_up("node-go")
        seq = await go_peer_drops(jetstream, nats_config, event_bus, event)

        (record,) = await dead_letters(event_bus, 1)
        assert_backstop_record(record, event, seq)
        assert record.stream == nats_config.stream_name
        assert record.subject == nats_config.subject_for("node.up")
        await advisories_settled(jetstream, nats_config, 1)

        # The same advisory again (a server repeating itself, a replayed capture).
        stream = advisory_stream_name(nats_config)
        advisory = await jetstream.get_msg(stream, 1)
        assert advisory.subject == f"{ADVISORY_PREFIX}.{nats_config.stream_name}.{GO_DURABLE}"
        fields = msgspec.json.decode(advisory.data or b"")
        assert (fields["consumer"], fields["stream_seq"]) == (GO_DURABLE, seq)
        await jetstream.publish(advisory.subject, advisory.data or b"")
        await advisories_settled(jetstream, nats_config, 2)

        assert len(await records(event_bus)) == 1


async def test_two_workers_write_one_record_per_dropped_message(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given two workers sharing the backstop,
    when a Go consumer drops an event,
    then one of them handles the advisory (delivered once, never redelivered) and there is one
    record."""
    workers = [worker_for(unrelated_app(nats_config), nats_config) for _ in range(2)]
    async with running(*workers):
        event = node_up("node-twice")
        seq = await go_peer_drops(jetstream, nats_config, event_bus, event)
        await advisories_settled(jetstream, nats_config, 1)
        info = await jetstream.consumer_info(
            advisory_stream_name(nats_config),
            backstop_durable(nats_config),
        )
        assert info.delivered is not None
        assert info.delivered.consumer_seq == 1
        assert info.num_redelivered == 0

        (record,) = await records(event_bus)
        assert_backstop_record(record, event, seq)


async def test_an_advisory_kept_while_no_worker_ran_is_recorded_even_if_the_message_is_gone(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a deployment whose workers have set up the backstop, then all stopped,
    when a Go consumer drops an event and the event stream then loses it (its limits),
    then the next worker still records it: without bytes, the reason saying the message is
    gone, and a replay of it is refused, saying why."""
    app = unrelated_app(nats_config)
    async with running(worker_for(app, nats_config)):
        pass
    event = node_up("node-gone")
    seq = await go_peer_drops(jetstream, nats_config, event_bus, event)
    assert await jetstream.delete_msg(nats_config.stream_name, seq)

    async with running(worker_for(app, nats_config)):
        (record,) = await dead_letters(event_bus, 1)
    assert record.consumer == GO_DURABLE
    assert record.reason == (
        f"the server stopped redelivering after {GO_MAX_DELIVER} deliveries to {GO_DURABLE}; "
        f"the message is gone from {nats_config.stream_name}, only its sequence is known"
    )
    assert (record.stream, record.stream_seq, record.data) == (nats_config.stream_name, seq, b"")
    assert record.deliveries == GO_MAX_DELIVER
    [entry] = [e async for e in DeadLetterQueue(event_bus).entries()]
    with pytest.raises(DeadLetterUnreadable, match="original message was gone"):
        await DeadLetterQueue(event_bus).replay(entry.id)


async def test_a_worker_without_the_backstop_sets_nothing_up(
    nats_config: NATSConfig, jetstream: JetStreamContext
) -> None:
    """Given a worker started with `backstop=False`,
    when it runs,
    then there is no advisory stream."""
    worker = Worker(unrelated_app(nats_config), config=nats_config, grace=1.0, backstop=False)
    async with running(worker):
        pass
    with pytest.raises(nats.js.errors.NotFoundError):
        await jetstream.stream_info(advisory_stream_name(nats_config))


async def test_a_non_advisory_on_the_advisory_subject_is_dropped_not_recorded(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a running worker,
    when something that is not an advisory is published on an advisory subject,
    then the backstop settles it without writing a record."""
    async with running(worker_for(unrelated_app(nats_config), nats_config)):
        subject = f"{ADVISORY_PREFIX}.{nats_config.stream_name}.someone"
        await jetstream.publish(subject, b"not json")
        stream = advisory_stream_name(nats_config)
        info = await consumer_info(jetstream, stream, backstop_durable(nats_config))
        assert info.delivered is not None
        assert info.delivered.consumer_seq == 1
        assert (info.num_ack_pending, info.num_pending) == (0, 0)
    assert await records(event_bus) == []


def test_each_event_stream_has_its_own_advisory_stream() -> None:
    """Given two event streams that share one dead-letter stream, and a config whose
    dead-letter stream is named like the event stream's advisories,
    when the advisory stream's name is asked for (as a worker does before starting),
    then the two event streams get one each, and the clash is refused naming it."""
    first, second = NATSConfig(stream_name="A"), NATSConfig(stream_name="B")

    assert (advisory_stream_name(first), advisory_stream_name(second)) == (
        "A_ADVISORIES",
        "B_ADVISORIES",
    )
    with pytest.raises(ConfigError, match="X_ADVISORIES"):
        advisory_stream_name(NATSConfig(stream_name="X", dlq_stream_name="X_ADVISORIES"))


async def test_workers_of_two_event_streams_sharing_a_dead_letter_stream_both_run(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a second event stream whose config shares this test's dead-letter stream,
    when a worker of each stream runs and a Go consumer of the first drops an event,
    then both workers start (each backstop has its advisory stream) and the dropped event has
    one record."""
    other = nats_config.replace(
        stream_name=f"{nats_config.stream_name}_2",
        stream_subjects=(f"second.{nats_config.subject_prefix}>",),
    )
    async with (
        running(worker_for(unrelated_app(nats_config), nats_config)),
        running(worker_for(unrelated_app(other), other)),
    ):
        event = node_up("shared-dlq")
        await go_peer_drops(jetstream, nats_config, event_bus, event)
        (record,) = await dead_letters(event_bus, 1)

    assert (record.consumer, record.event_id) == (GO_DURABLE, event.id)


async def test_a_backstop_that_cannot_be_set_up_leaves_the_handlers_working(
    nats_config: NATSConfig,
    event_bus: NATSEventBus,
    jetstream: JetStreamContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Given a stream of the advisory stream's name that belongs to something else,
    when a worker starts,
    then it logs one ERROR saying the backstop is not running and what to do, and its
    handlers still handle their events."""
    await jetstream.add_stream(
        name=advisory_stream_name(nats_config), subjects=[f"squatter.{nats_config.stream_name}"]
    )
    app = App("svc", nats_config)
    handled: list[str] = []

    @app.on("node.up")
    async def handle(event: Event) -> None:
        handled.append(event.id)

    event = node_up()
    with caplog.at_level(logging.ERROR, logger="gdc_worker.worker"):
        async with running(worker_for(app, nats_config)):
            await event_bus.publish_event(event)
            await eventually(lambda: handled == [event.id], "the event handled")

    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].startswith("dead-letter backstop not running: ")
