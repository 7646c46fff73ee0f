"""Publish-before-ack on a real server: what a handler publishes with `ctx.publish` is sent at
once, and its event is settled only once all of it is stored."""

from __future__ import annotations

from pathlib import Path

import anyio
import msgspec
import pytest
from nats.js import JetStreamContext

from gdc_worker import (
    App,
    Context,
    Decision,
    Delivery,
    Event,
    HandlerSpec,
    Hook,
    NATSConfig,
    NATSEventBus,
    PendingPublish,
    PublishRefused,
    RetryPolicy,
    Worker,
)
from gdc_worker.server import NATSServer
from gdc_worker.settle import Ack
from tests.support import GRACE, consumer_info, dead_letters, eventually, node_up, running

pytestmark = pytest.mark.anyio


class Journal(Hook):
    """Notes, in order, each publish that ended (`<outcome> <event.subject>`: a handler's output
    names its input in `subject`) and each delivery acked (`acked <event id>`)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def published(
        self,
        subject: str,
        event: Event,
        outcome: str,
        error: BaseException | None,
        duration_s: float,
    ) -> None:
        self.lines.append(f"{outcome} {event.subject}")

    def delivery_settled(
        self, handler: HandlerSpec, delivery: Delivery, decision: Decision
    ) -> None:
        if isinstance(decision, Ack):
            self.lines.append(f"acked {Event.from_json(delivery.data).id}")


def output_of(event: Event, n: int = 0) -> Event:
    """The n-th node.down a handler publishes for `event`, with an id derived from its id."""
    return msgspec.structs.replace(
        Event.new("node.down", "svc", event.id, {"n": n}), id=f"{event.id}-{n}"
    )


async def test_every_output_is_stored_before_its_event_is_acked(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a handler that publishes 10 node.down per node.up with ctx.publish, awaiting none,
    when 5 node.up are handled,
    then each event is acked only after JetStream stored all 10 of its outputs, the stream
    holds the 50 outputs, and what ctx.publish returned, awaited, is the output's sequence."""
    journal = Journal()
    app = App("svc", nats_config, hooks=[journal])
    last: list[PendingPublish] = []

    @app.on("node.up")
    async def fan_out(event: Event, ctx: Context) -> None:
        for n in range(10):
            pending = await ctx.publish(output_of(event, n))
        last.append(pending)

    events = [node_up(f"node-{i}") for i in range(5)]
    async with running(Worker(app, config=nats_config, grace=GRACE)):
        for event in events:
            await event_bus.publish_event(event)
        await eventually(
            lambda: sum(line.startswith("acked ") for line in journal.lines) == 5, "5 acks"
        )
        info = await consumer_info(jetstream, nats_config.stream_name, "svc-fan_out")

    assert (info.num_pending, info.num_ack_pending) == (0, 0)
    for event in events:
        acked = journal.lines.index(f"acked {event.id}")
        assert journal.lines[:acked].count(f"stored {event.id}") == 10
    outputs = await event_bus.count_messages(
        nats_config.stream_name, nats_config.subject_for("node.down")
    )
    assert outputs == 50
    for pending in last:
        seq = await pending
        assert seq is not None
        stored = await jetstream.get_msg(nats_config.stream_name, seq)
        assert Event.from_json(stored.data or b"").data == {"n": 9}


async def test_a_publishing_handler_runs_no_more_calls_at_once_than_its_concurrency(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a handler of concurrency 2 that publishes an output for each event and takes
    10 ms (its deliveries waiting for their outputs' acks hold no call, so more are in flight),
    when 40 events are handled,
    then no more than 2 calls ever ran at once, and every event is acked with its output
    stored."""
    running_now = most = 0
    app = App("svc", nats_config)

    @app.on("node.up", concurrency=2)
    async def schedule(event: Event, ctx: Context) -> None:
        nonlocal running_now, most
        running_now += 1
        most = max(most, running_now)
        try:
            await anyio.sleep(0.01)
            await ctx.publish(output_of(event))
        finally:
            running_now -= 1

    async with running(Worker(app, config=nats_config, grace=GRACE)):
        for n in range(40):
            await event_bus.publish_event(node_up(f"node-{n}"))
        info = await consumer_info(jetstream, nats_config.stream_name, "svc-schedule")

    assert (info.num_pending, info.num_ack_pending) == (0, 0)
    assert most == 2
    outputs = await event_bus.count_messages(
        nats_config.stream_name, nats_config.subject_for("node.down")
    )
    assert outputs == 40


async def test_an_output_no_stream_takes_fails_the_delivery_until_it_is_dead_lettered(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a worker bound to its stream, which is then narrowed to capture node.up only,
    and a handler (max_deliver 2, no in-process retries) publishing one node.down per node.up,
    when a node.up is handled,
    then its delivery is nak'd and not acked, and after the second delivery it is
    dead-lettered with the PublishError naming the output's subject."""
    app = App("svc", nats_config)
    calls: list[int] = []

    @app.on("node.up", max_deliver=2, backoff=[0.1], retry=None)
    async def relay(event: Event, ctx: Context) -> None:
        calls.append(ctx.deliveries)
        await ctx.publish(output_of(event))

    event = node_up()
    async with running(Worker(app, config=nats_config, grace=GRACE)):
        stream = (await jetstream.stream_info(nats_config.stream_name)).config
        stream.subjects = [nats_config.subject_for("node.up")]
        await jetstream.update_stream(stream)
        await event_bus.publish_event(event)
        [record] = await dead_letters(event_bus)

    assert calls == [1, 2]
    assert record.event_id == event.id
    assert record.reason == "failed on delivery 2 of 2"
    assert record.error_type == "PublishError"
    assert f"event {event.id}-0 to {nats_config.subject_for('node.down')}" in record.error_message
    assert await event_bus.count_messages(nats_config.stream_name) == 1  # the input alone


@pytest.mark.parametrize(
    ("limit", "named"),
    [("server", "max_payload"), ("stream", "message size exceeds maximum allowed")],
)
async def test_an_output_jetstream_will_never_take_dead_letters_its_event_at_once(
    nats_config: NATSConfig,
    event_bus: NATSEventBus,
    jetstream: JetStreamContext,
    limit: str,
    named: str,
) -> None:
    """Given a handler with in-process retries and redeliveries left, whose ctx.publish is of
    an event over the server's max_payload, or over the stream's max_msg_size (which the
    client cannot know: the stream refuses it in its ack), which every attempt would publish
    again,
    when a node.up is handled,
    then it is called once and its event is dead-lettered on its first delivery, the reason
    and the PublishRefused naming the limit, rather than after ~96 s of retries; the stream
    holds the input alone."""
    size = event_bus.max_payload
    if limit == "stream":
        config = (await jetstream.stream_info(nats_config.stream_name)).config
        config.max_msg_size = size = 2048
        await jetstream.update_stream(config)
    app = App("svc", nats_config)
    calls: list[int] = []

    @app.on("node.up", retry=RetryPolicy.attempts(3, initial=0.01))
    async def oversized(event: Event, ctx: Context) -> None:
        calls.append(ctx.deliveries)
        big = "x" * size
        await ctx.publish(Event.new("node.down", "svc", event.id, {"blob": big}))

    event = node_up()
    async with running(Worker(app, config=nats_config, grace=GRACE)):
        await event_bus.publish_event(event)
        [record] = await dead_letters(event_bus)

    assert calls == [1]
    assert (record.event_id, record.deliveries) == (event.id, 1)
    assert record.reason.startswith("what it published was refused: ")
    assert named in record.reason
    assert record.error_type == "PublishRefused"
    assert await event_bus.count_messages(nats_config.stream_name) == 1


#: A service user who may publish anything but node.down events.
_NO_NODE_DOWN = """
authorization {
  users = [
    {user: admin, password: admin}
    {user: svc, password: svc, permissions: {publish: {deny: ["gdc.events.node.down"]}}}
  ]
}
"""


async def test_an_output_the_user_may_not_publish_dead_letters_its_event_at_once(
    tmp_path: Path,
) -> None:
    """Given a handler with in-process retries and redeliveries left, run by a user the
    server does not let publish node.down, whose ctx.publish is of a node.down, and a
    connect timeout of 10 s,
    when a node.up is handled,
    then it is called once and its event is dead-lettered on its first delivery, as soon as
    the server refuses the publish, the reason saying permission was denied for the output's
    subject: not retried for minutes as if the ack were only late."""
    with NATSServer(config=_NO_NODE_DOWN, store_dir=tmp_path / "store") as server:
        admin = NATSConfig(url=f"nats://admin:admin@127.0.0.1:{server.port}")
        config = admin.replace(url=f"nats://svc:svc@127.0.0.1:{server.port}", connect_timeout=10.0)
        app = App("svc", config)
        calls: list[int] = []

        @app.on("node.up", retry=RetryPolicy.attempts(3, initial=0.01))
        async def report(event: Event, ctx: Context) -> None:
            calls.append(ctx.deliveries)
            await ctx.publish(Event.new("node.down", "svc", event.id, {"reason": "gone"}))

        event = node_up()
        async with (
            await NATSEventBus.connect(admin) as bus,
            running(Worker(app, config=config, grace=GRACE)),
        ):
            await bus.publish_event(event)
            [record] = await dead_letters(bus, timeout=config.connect_timeout / 2)

    assert calls == [1]
    assert (record.event_id, record.deliveries) == (event.id, 1)
    assert record.reason.startswith("what it published was refused: ")
    assert "permission denied: the server says permissions violation" in record.reason
    assert f'"{config.subject_for("node.down")}"' in record.reason
    assert record.error_type == "PublishRefused"


async def test_a_retrys_outputs_are_awaited_and_the_first_attempts_deduplicated(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a handler with 2 in-process attempts that publishes its output (an id derived from
    its event's), then fails on its first attempt,
    when a node.up is handled,
    then the retry's output is seen as a duplicate before the event is acked, and the stream
    holds one output."""
    journal = Journal()
    app = App("svc", nats_config, hooks=[journal])
    attempts: list[str] = []

    @app.on("node.up", retry=RetryPolicy.attempts(2, initial=0.01))
    async def flaky(event: Event, ctx: Context) -> None:
        await ctx.publish(output_of(event))
        attempts.append(event.id)
        if len(attempts) == 1:
            raise RuntimeError("the first attempt fails after publishing")

    event = node_up()
    async with running(Worker(app, config=nats_config, grace=GRACE)):
        await event_bus.publish_event(event)
        await eventually(lambda: f"acked {event.id}" in journal.lines, "the event acked")

    assert journal.lines == [f"stored {event.id}", f"duplicate {event.id}", f"acked {event.id}"]
    assert len(attempts) == 2
    outputs = await event_bus.count_messages(
        nats_config.stream_name, nats_config.subject_for("node.down")
    )
    assert outputs == 1


async def test_ctx_publish_after_the_handler_returned_is_refused_and_stores_nothing(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given a handler that leaves a task behind which publishes with its ctx later,
    when the handler has returned and its event is acked, and the task then publishes,
    then ctx.publish raises PublishRefused naming the settled event, and nothing is stored:
    an output nobody waits for, whose failure nobody would see, is not sent at all."""
    journal = Journal()
    app = App("svc", nats_config, hooks=[journal])
    acked = anyio.Event()
    raised: list[BaseException] = []

    async def later(event: Event, ctx: Context) -> None:
        await acked.wait()
        try:
            await ctx.publish(output_of(event))
        except PublishRefused as exc:
            raised.append(exc)

    @app.on("node.up")
    async def leave_behind(event: Event, ctx: Context) -> None:
        tg.start_soon(later, event, ctx)

    event = node_up()
    async with (
        anyio.create_task_group() as tg,
        running(Worker(app, config=nats_config, grace=GRACE)),
    ):
        await event_bus.publish_event(event)
        await eventually(lambda: f"acked {event.id}" in journal.lines, "the event acked")
        acked.set()
        await eventually(lambda: raised, "ctx.publish to raise")

    [error] = raised
    assert f"after handler leave_behind returned for event {event.id}" in str(error)
    outputs = await event_bus.count_messages(
        nats_config.stream_name, nats_config.subject_for("node.down")
    )
    assert outputs == 0
