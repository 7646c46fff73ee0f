"""Workers against a real nats-server: acks, retries, dead letters, replicas, stopping."""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections import Counter
from pathlib import Path

import anyio
import anyio.abc
import anyio.from_thread
import nats
import nats.js.errors
import pytest
from nats.js import JetStreamContext

from gdc_worker import (
    App,
    ConfigError,
    ConnectionFailed,
    Context,
    DeadLetterQueue,
    Event,
    NATSConfig,
    NATSEventBus,
    NATSServer,
    PinRequestedEvent,
    PlanReadyEvent,
    Reject,
    Retry,
    Worker,
    new_node_down_event,
    new_node_up_event,
    new_pin_requested_event,
    new_plan_ready_event,
    parse_event_data,
)
from gdc_worker.worker import CLOSE_S
from tests.processes import RECORDER_DURABLE, Spawn, ids, node_ups, worker_env
from tests.recording import ARRIVAL_TIMEOUT
from tests.support import (
    FAST_RETRY,
    GRACE,
    STOP_TIMEOUT,
    Calls,
    acked_up_to,
    alive,
    consumer_info,
    dead_letters,
    eventually,
    free_port,
    frozen,
    node_up,
    running,
    settled,
    worker_for,
)

pytestmark = pytest.mark.anyio

#: Deadline for events handed back by a stopped worker: far below their 30 s ack wait.
HANDBACK_TIMEOUT = 5.0


# -- acks and retries ----------------------------------------------------------------------------


async def test_a_handled_event_is_acked_once(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a worker with a handler that returns,
    when an event is published,
    then the handler is called once with it (and a context describing the delivery), the
    consumer ends with nothing pending or unacknowledged, and a later event is handled while
    the first is still counted once."""
    app = App("svc", nats_config)
    calls = Calls()
    contexts: list[tuple[Event, str, int]] = []

    @app.on("node.up", retry=None)
    async def handle(event: Event, ctx: Context) -> None:
        contexts.append((ctx.event, ctx.handler, ctx.stream_seq))
        ctx.log.info("handled")
        calls.record(event, ctx)

    async with running(worker_for(app, nats_config)):
        event = node_up("node-1")
        seq = await event_bus.publish_event(event)
        await calls.wait_for_event(event)
        info = await consumer_info(jetstream, nats_config.stream_name, "svc-handle")
        sentinel = node_up("node-2")
        await event_bus.publish_event(sentinel)
        await calls.wait_for_event(sentinel)

    assert (info.num_ack_pending, info.num_pending, acked_up_to(info)) == (0, 0, seq)
    assert calls.ids == [event.id, sentinel.id]
    assert [c.deliveries for c in calls.items] == [1, 1]
    assert contexts[0] == (event, "handle", seq)


async def test_a_handler_failing_twice_succeeds_within_the_in_process_retries(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a handler that raises on its first two calls and a three-attempt retry policy,
    when an event is published,
    then it is called three times, all on the first delivery (no redelivery), and acked."""
    app = App("svc", nats_config)
    calls = Calls()

    @app.on("node.up", retry=FAST_RETRY)
    async def flaky(event: Event, ctx: Context) -> None:
        calls.record(event, ctx)
        if len(calls.items) < 3:
            raise RuntimeError(f"transient failure {len(calls.items)}")

    async with running(worker_for(app, nats_config)):
        event = node_up()
        await event_bus.publish_event(event)
        await calls.wait_for(3)
        info = await consumer_info(jetstream, nats_config.stream_name, "svc-flaky")

    assert (info.num_ack_pending, info.num_pending) == (0, 0)
    assert [(c.event.id, c.deliveries) for c in calls.items] == [(event.id, 1)] * 3


async def test_an_always_failing_handler_is_dead_lettered_after_max_deliver(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a handler that always raises, max_deliver 3, no in-process retries,
    when an event is published,
    then it is called on deliveries 1, 2 and 3, then a dead letter records the error, its
    traceback, the delivery facts and the original event and bytes, and the message is no
    longer pending on the consumer."""
    app = App("svc", nats_config)
    calls = Calls()

    @app.on("node.up", max_deliver=3, retry=None, backoff=(0.05,))
    async def always_fails(event: Event, ctx: Context) -> None:
        calls.record(event, ctx)
        raise RuntimeError(f"boom on delivery {ctx.deliveries}")

    async with running(worker_for(app, nats_config)):
        event = node_up()
        seq = await event_bus.publish_event(event)
        [record] = await dead_letters(event_bus)
        info = await consumer_info(jetstream, nats_config.stream_name, "svc-always_fails")

    assert [(c.event.id, c.deliveries) for c in calls.items] == [(event.id, n) for n in (1, 2, 3)]
    assert (record.error_type, record.error_message) == ("RuntimeError", "boom on delivery 3")
    assert "RuntimeError: boom on delivery 3" in record.traceback
    assert "always_fails" in record.traceback  # the handler's frame
    assert "3 of 3" in record.reason
    assert (record.deliveries, record.consumer, record.handler) == (
        3,
        "svc-always_fails",
        "always_fails",
    )
    assert (record.stream, record.stream_seq) == (nats_config.stream_name, seq)
    assert record.subject == nats_config.subject_for("node.up")
    assert (record.event, record.data) == (event, event.to_json())
    assert record.headers["Nats-Msg-Id"] == event.id
    assert (info.num_ack_pending, info.num_pending) == (0, 0)
    assert len(calls.items) == 3


async def test_reject_dead_letters_the_event_at_once(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a handler that raises Reject("bad ..."), with retries and deliveries to spare,
    when an event is published,
    then it is called once and the event is dead-lettered with the reason."""
    app = App("svc", nats_config)
    calls = Calls()

    @app.on("node.up", retry=FAST_RETRY, max_deliver=5)
    async def picky(event: Event, ctx: Context) -> None:
        calls.record(event, ctx)
        raise Reject("bad node id")

    async with running(worker_for(app, nats_config)):
        event = node_up()
        await event_bus.publish_event(event)
        [record] = await dead_letters(event_bus)
        info = await consumer_info(jetstream, nats_config.stream_name, "svc-picky")

    assert calls.ids == [event.id]
    assert "bad node id" in record.reason
    assert (record.error_type, record.deliveries, record.event) == ("Reject", 1, event)
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_a_message_that_is_not_an_event_is_dead_lettered_without_calling_the_handler(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a worker on node.up,
    when a non-JSON message lands on the node.up subject, followed by a valid event,
    then the message is dead-lettered at once with its raw bytes and no event, and the handler
    is called only with the valid event."""
    app = App("svc", nats_config)
    calls = Calls()

    @app.on("node.up", retry=FAST_RETRY)
    async def handle(event: Event) -> None:
        calls.record(event)

    raw = b"\x00 not json at all"
    async with running(worker_for(app, nats_config)):
        ack = await jetstream.publish(nats_config.subject_for("node.up"), raw)
        [record] = await dead_letters(event_bus)
        event = node_up()
        await event_bus.publish_event(event)
        await calls.wait_for_event(event)
        info = await consumer_info(jetstream, nats_config.stream_name, "svc-handle")

    assert (record.event, record.data, record.stream_seq) == (None, raw, ack.seq)
    assert (record.event_type, record.error_type, record.deliveries) == (
        "invalid",
        "EventDecodeError",
        1,
    )
    assert record.reason.startswith("not a valid GDC event: ")
    assert calls.ids == [event.id]
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_retry_redelivers_the_event_after_its_delay(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a handler that raises Retry(delay=0.5) on the first delivery (under a policy that
    would otherwise retry in-process),
    when an event is published,
    then the second call comes on delivery 2, at least about 0.5 s after the first, and the
    event is then acked."""
    app = App("svc", nats_config)
    calls = Calls()

    @app.on("node.up", retry=FAST_RETRY)
    async def later(event: Event, ctx: Context) -> None:
        calls.record(event, ctx)
        if ctx.deliveries == 1:
            raise Retry(delay=0.5)

    async with running(worker_for(app, nats_config)):
        await event_bus.publish_event(node_up())
        first, second = await calls.wait_for(2)
        info = await consumer_info(jetstream, nats_config.stream_name, "svc-later")

    assert (first.deliveries, second.deliveries) == (1, 2)
    assert second.at - first.at >= 0.45  # a lower bound: the nak delay was honoured
    assert (info.num_ack_pending, info.num_pending) == (0, 0)
    assert len(calls.items) == 2


async def test_a_handler_running_longer_than_ack_wait_is_not_redelivered(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given ack_wait 1 s and a handler that takes 2.5 s the first time,
    when an event is published, then (after it finished) a sentinel,
    then the slow event was called once (the worker kept it in progress, so JetStream did not
    hand it out again), the sentinel is handled and nothing is left unacknowledged."""
    app = App("svc", nats_config)
    calls = Calls()
    slow_done = anyio.Event()

    @app.on("node.up", ack_wait=1.0, retry=None)
    async def slow(event: Event, ctx: Context) -> None:
        calls.record(event, ctx)
        if len(calls.items) == 1:
            await anyio.sleep(2.5)
            slow_done.set()

    async with running(worker_for(app, nats_config)):
        event = node_up("node-slow")
        await event_bus.publish_event(event)
        with anyio.fail_after(ARRIVAL_TIMEOUT):
            await slow_done.wait()
        sentinel = node_up("node-sentinel")
        await event_bus.publish_event(sentinel)
        await calls.wait_for_event(sentinel)
        info = await consumer_info(jetstream, nats_config.stream_name, "svc-slow")

    assert calls.ids == [event.id, sentinel.id]
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_timeout_cancels_a_slow_attempt_and_the_next_attempt_runs(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given timeout 0.2 s and a handler whose first attempt would take 10 s,
    when an event is published,
    then the first attempt is cancelled and the in-process retry succeeds on the same delivery,
    and the event is acked."""
    app = App("svc", nats_config)
    calls = Calls()
    cancelled: list[str] = []

    @app.on("node.up", timeout=0.2, retry=FAST_RETRY)
    async def sometimes_slow(event: Event, ctx: Context) -> None:
        calls.record(event, ctx)
        if len(calls.items) == 1:
            try:
                await anyio.sleep(10)
            except anyio.get_cancelled_exc_class():
                cancelled.append(event.id)
                raise

    async with running(worker_for(app, nats_config)):
        event = node_up()
        await event_bus.publish_event(event)
        await calls.wait_for(2)
        info = await consumer_info(jetstream, nats_config.stream_name, "svc-sometimes_slow")

    assert [(c.event.id, c.deliveries) for c in calls.items] == [(event.id, 1)] * 2
    assert cancelled == [event.id]
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_an_always_slow_handler_is_dead_lettered_with_timeout_error(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given timeout 0.2 s, max_deliver 2 and a handler that always takes 10 s,
    when an event is published,
    then each delivery's attempt is cancelled and the event is dead-lettered as TimeoutError."""
    app = App("svc", nats_config)
    calls = Calls()

    @app.on("node.up", timeout=0.2, retry=None, max_deliver=2, backoff=(0.05,))
    async def always_slow(event: Event, ctx: Context) -> None:
        calls.record(event, ctx)
        await anyio.sleep(10)

    async with running(worker_for(app, nats_config)):
        event = node_up()
        await event_bus.publish_event(event)
        [record] = await dead_letters(event_bus)
        info = await consumer_info(jetstream, nats_config.stream_name, "svc-always_slow")

    assert [c.deliveries for c in calls.items] == [1, 2]
    assert (record.error_type, record.deliveries, record.event) == ("TimeoutError", 2, event)
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_a_sync_handler_runs_in_a_thread_and_is_acked(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a plain (non-async) handler taking (event, ctx),
    when an event is published,
    then it is called once, in a thread other than the event loop's, and the event is acked."""
    app = App("svc", nats_config)
    calls = Calls()

    @app.on("node.up", retry=None)
    def blocking(event: Event, ctx: Context) -> None:
        calls.record_from_thread(event, ctx)

    async with running(worker_for(app, nats_config)):
        event = node_up()
        await event_bus.publish_event(event)
        [call] = await calls.wait_for(1)
        info = await consumer_info(jetstream, nats_config.stream_name, "svc-blocking")

    assert (call.event, call.deliveries) == (event, 1)
    assert call.thread != threading.get_ident()
    assert (info.num_ack_pending, info.num_pending) == (0, 0)
    assert len(calls.items) == 1


async def test_a_delivery_past_max_deliver_is_dead_lettered_without_running_the_handler(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given an event delivered twice on a consumer and never settled (two attempts that died:
    here a raw client fetches and naks it),
    when a worker with max_deliver 2 starts on that consumer,
    then delivery 3 is dead-lettered without calling the handler, with a reason naming
    max_deliver, and a later event is handled."""
    app = App("svc", nats_config)
    calls = Calls()

    @app.on("node.up", max_deliver=2, retry=None)
    async def handle(event: Event, ctx: Context) -> None:
        calls.record(event, ctx)

    await event_bus.ensure_consumer("svc-handle", nats_config.subject_for("node.up"))
    event = node_up()
    await event_bus.publish_event(event)
    pull = await jetstream.pull_subscribe_bind(
        consumer="svc-handle", stream=nats_config.stream_name
    )
    for expected in (1, 2):
        [msg] = await pull.fetch(1, timeout=ARRIVAL_TIMEOUT)
        assert msg.metadata.num_delivered == expected
        await msg.nak()
    await pull.unsubscribe()

    async with running(worker_for(app, nats_config)):
        [record] = await dead_letters(event_bus)
        sentinel = node_up("node-2")
        await event_bus.publish_event(sentinel)
        await calls.wait_for_event(sentinel)
        info = await consumer_info(jetstream, nats_config.stream_name, "svc-handle")

    assert calls.ids == [sentinel.id]
    assert (record.event, record.deliveries, record.error_type) == (event, 3, "")
    assert "max_deliver=2" in record.reason
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_handlers_run_at_most_their_concurrency_at_a_time(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given a handler with concurrency 2 that takes 50 ms,
    when six events are published at once,
    then all six are handled, never more than two at a time, and two at a time at some point."""
    app = App("svc", nats_config)
    calls = Calls()
    in_flight = 0
    peak = 0

    @app.on("node.up", concurrency=2, retry=None)
    async def limited(event: Event) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await anyio.sleep(0.05)
        in_flight -= 1
        calls.record(event)

    events = [node_up(f"node-{i}") for i in range(6)]
    async with running(worker_for(app, nats_config)):
        for event in events:
            await event_bus.publish_event_async(event)
        await event_bus.flush()
        await calls.wait_for(6)

    assert sorted(calls.ids) == sorted(e.id for e in events)
    assert peak == 2


async def test_a_worker_runs_only_the_handlers_it_is_given(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given an app with handlers on node.up and node.down,
    when a worker runs with `handlers=["ups"]` and one event of each type is published,
    then only `ups` is called, and no consumer is created for `downs`."""
    app = App("svc", nats_config)
    calls = Calls()

    @app.on("node.up", retry=None)
    async def ups(event: Event) -> None:
        calls.record(event)

    @app.on("node.down", retry=None)
    async def downs(event: Event) -> None:
        calls.record(event)

    async with running(Worker(app, config=nats_config, handlers=["ups"], grace=GRACE)):
        await event_bus.publish_event(new_node_down_event("monitor", "node-1", "reboot"))
        event = node_up()
        await event_bus.publish_event(event)
        await calls.wait_for_event(event)

    assert calls.ids == [event.id]
    with pytest.raises(nats.js.errors.NotFoundError):
        await jetstream.consumer_info(nats_config.stream_name, "svc-downs")


# -- services and replicas -----------------------------------------------------------------------


def register_recorder(app: App, calls: Calls) -> None:
    """Register `handle` on node.up in `app`, recording its calls in `calls`."""

    @app.on("node.up", retry=None)
    async def handle(event: Event) -> None:
        calls.record(event)


async def test_two_services_on_one_type_each_get_every_event_once(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given two services (apps with different names) with a handler of the same name on node.up,
    when 20 events are published,
    then each service handles each of them exactly once."""
    apps = {name: App(name, nats_config) for name in ("scheduler", "auditor")}
    calls = {name: Calls() for name in apps}
    for name, app in apps.items():
        register_recorder(app, calls[name])

    events = [node_up(f"node-{i}") for i in range(20)]
    workers = [worker_for(app, nats_config) for app in apps.values()]
    async with running(*workers):
        for event in events:
            await event_bus.publish_event_async(event)
        await event_bus.flush()
        for name in apps:
            await calls[name].wait_for(20)
        infos = [
            await consumer_info(jetstream, nats_config.stream_name, f"{name}-handle")
            for name in apps
        ]

    expected = Counter(e.id for e in events)
    for name in apps:
        assert Counter(calls[name].ids) == expected, name
    assert [(i.num_ack_pending, i.num_pending) for i in infos] == [(0, 0), (0, 0)]


async def test_two_replicas_of_a_service_split_the_events_without_duplicates(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given two workers of the same app (one durable), with a handler that yields,
    when 200 events are published,
    then together they handle every event, no event is handled by both or twice, and each
    replica handled some."""
    app = App("svc", nats_config)
    calls = Calls()

    @app.on("node.up", retry=None)
    async def handle(event: Event) -> None:
        await anyio.sleep(0.005)
        calls.record(event)

    events = [node_up(f"node-{i}") for i in range(200)]
    async with running(worker_for(app, nats_config), worker_for(app, nats_config)):
        for event in events:
            await event_bus.publish_event_async(event)
        await event_bus.flush()
        await calls.wait_for(200)
        info = await consumer_info(jetstream, nats_config.stream_name, "svc-handle")

    by_replica = {
        replica: [c.event.id for c in calls.items if c.replica == replica] for replica in "01"
    }
    first, second = set(by_replica["0"]), set(by_replica["1"])
    assert first | second == {e.id for e in events}
    assert first & second == set()
    assert len(calls.items) == 200  # no duplicates within a replica either
    assert len(first) >= 1, "replica 1 did all the work"
    assert len(second) >= 1, "replica 0 did all the work"
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


@pytest.mark.parametrize(
    ("own_trace_id", "expected"),
    [("", "trace-of-request"), ("trace-own", "trace-own")],
    ids=["inherited", "kept"],
)
async def test_ctx_publish_inherits_the_trace_id_unless_the_event_has_one(
    nats_config: NATSConfig, event_bus: NATSEventBus, own_trace_id: str, expected: str
) -> None:
    """Given a handler on pin.requested that publishes plan.ready with `ctx.publish`,
    when a pin request with trace id `trace-of-request` is handled,
    then the plan carries the request's trace id if it had none, else keeps its own."""
    app = App("scheduler", nats_config)
    plans = Calls()

    @app.on("pin.requested", retry=None)
    async def schedule(event: Event, ctx: Context) -> None:
        request = parse_event_data(event, PinRequestedEvent)
        plan = PlanReadyEvent(plan_id="plan-1", cid=request.cid)
        await ctx.publish(new_plan_ready_event("scheduler", plan, trace_id=own_trace_id))

    @app.on("plan.ready", retry=None)
    async def audit(event: Event) -> None:
        plans.record(event)

    request = new_pin_requested_event(
        "api-gateway", PinRequestedEvent(cid="QmTrace"), trace_id="trace-of-request"
    )
    async with running(worker_for(app, nats_config)):
        await event_bus.publish_event(request)
        [plan] = await plans.wait_for(1)

    assert plan.event.trace_id == expected
    assert parse_event_data(plan.event, PlanReadyEvent).cid == "QmTrace"


# -- stopping ------------------------------------------------------------------------------------


async def test_graceful_stop_finishes_running_handlers_and_hands_back_the_rest(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a worker (concurrency 4, ack_wait 30 s) with three handlers running, held open,
    when it is stopped, three more events are published once it has dropped its pull requests,
    and the handlers are let go,
    then the three finish and are acked before `run` returns, and a second worker of the same
    app started afterwards gets the other three within 5 s (not after the 30 s ack wait).

    (An event the server dispatches at the very moment a worker drops its pull requests never
    reaches it and comes back after the ack wait: JetStream's own race, not tested here.)"""
    app = App("svc", nats_config)
    calls = Calls()
    finished: list[str] = []
    gate = anyio.Event()

    @app.on("node.up", concurrency=4, ack_wait=30.0, retry=None)
    async def held(event: Event, ctx: Context) -> None:
        calls.record(event, ctx)
        await gate.wait()
        finished.append(event.id)

    first_batch = [node_up(f"node-{i}") for i in range(3)]
    second_batch = [node_up(f"node-{i}") for i in range(3, 6)]
    for event in first_batch:
        await event_bus.publish_event(event)
    first = worker_for(app, nats_config, grace=30.0)
    async with running(first) as [returned]:
        await calls.wait_for(3)
        first.stop()
        await consumer_info(
            jetstream, nats_config.stream_name, "svc-held", until=lambda i: i.num_waiting == 0
        )
        for event in second_batch:
            await event_bus.publish_event(event)
        assert not returned.is_set()
        gate.set()
        with anyio.fail_after(STOP_TIMEOUT):
            await returned.wait()
        finished_when_returned = list(finished)

    assert sorted(finished_when_returned) == sorted(e.id for e in first_batch)
    info = await consumer_info(
        jetstream,
        nats_config.stream_name,
        "svc-held",
        until=lambda i: acked_up_to(i) >= 3,
    )
    assert acked_up_to(info) >= 3

    async with running(worker_for(app, nats_config)):
        await calls.wait_for(6, timeout=HANDBACK_TIMEOUT)
        info = await consumer_info(jetstream, nats_config.stream_name, "svc-held")

    assert sorted(calls.ids) == sorted(e.id for e in first_batch + second_batch)
    assert (info.num_ack_pending, info.num_pending) == (0, 0)
    assert [c.deliveries for c in calls.items[3:]] == [1, 1, 1]


async def test_a_graceful_stop_hands_back_deliveries_waiting_for_a_call(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a publishing handler (it takes a ctx) of concurrency 2, whose worker holds more
    deliveries than that in flight, running two calls while two more deliveries wait for one,
    when the worker is stopped gracefully and the running call then finishes,
    then only those calls ran: the two waiting were handed back at the stop, not run during the
    grace period, and a second worker handles them on their second delivery."""
    app = App("svc", nats_config)
    calls = Calls()
    finished: list[str] = []
    gate = anyio.Event()

    @app.on("node.up", concurrency=2, retry=None)
    async def held(event: Event, ctx: Context) -> None:
        calls.record(event, ctx)
        await gate.wait()
        finished.append(event.id)

    events = [node_up(f"node-{i}") for i in range(4)]
    first = worker_for(app, nats_config, grace=30.0)
    async with running(first) as [returned]:
        for event in events:
            await event_bus.publish_event(event)
        await calls.wait_for(2)
        await consumer_info(
            jetstream, nats_config.stream_name, "svc-held", until=lambda i: i.num_pending == 0
        )
        first.stop()
        gate.set()
        with anyio.fail_after(STOP_TIMEOUT):
            await returned.wait()

    assert len(finished) == 2
    async with running(worker_for(app, nats_config)):
        await calls.wait_for(4, timeout=HANDBACK_TIMEOUT)
        info = await consumer_info(jetstream, nats_config.stream_name, "svc-held")

    assert sorted(calls.ids) == sorted(e.id for e in events)
    assert [c.deliveries for c in calls.items[2:]] == [2, 2]
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


@pytest.mark.parametrize("how", ["stop-twice", "grace-expired"])
async def test_forced_stop_cancels_running_handlers_and_hands_their_events_back(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext, how: str
) -> None:
    """Given a worker (concurrency 8, ack_wait 30 s) with two handlers that never finish on
    first delivery and free slots (so a pull request is open),
    when it is stopped twice, or once with a grace of 0.3 s,
    then `run` returns with both handlers cancelled, and a second worker of the same app gets
    both events within 5 s (on delivery 2, not after the ack wait)."""
    app = App("svc", nats_config)
    calls = Calls()
    cancelled: list[str] = []

    @app.on("node.up", concurrency=8, ack_wait=30.0, retry=None)
    async def stuck(event: Event, ctx: Context) -> None:
        calls.record(event, ctx)
        if ctx.deliveries == 1:
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                cancelled.append(event.id)
                raise

    events = [node_up(f"node-{i}") for i in range(2)]
    worker = worker_for(app, nats_config, grace=30.0 if how == "stop-twice" else 0.3)
    async with running(worker) as [returned]:
        for event in events:
            await event_bus.publish_event(event)
        await calls.wait_for(2)
        worker.stop()
        if how == "stop-twice":
            worker.stop()
        with anyio.fail_after(STOP_TIMEOUT):
            await returned.wait()

    assert sorted(cancelled) == sorted(e.id for e in events)

    async with running(worker_for(app, nats_config)):
        await calls.wait_for(4, timeout=HANDBACK_TIMEOUT)
        info = await consumer_info(jetstream, nats_config.stream_name, "svc-stuck")

    redelivered = calls.items[2:]
    assert sorted(c.event.id for c in redelivered) == sorted(e.id for e in events)
    assert [c.deliveries for c in redelivered] == [2, 2]
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_an_event_arriving_during_a_graceful_stop_is_handed_back_once(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given a worker with free slots (concurrency 32) and one handler held open,
    when it is stopped, an event is published, and the held handler finishes 0.5 s later,
    then a second worker of the same app handles the late event, on its first or second
    delivery, and does not dead-letter it as delivered more than max_deliver (5) times."""
    app = App("svc", nats_config)
    calls = Calls()
    gate = anyio.Event()

    @app.on("node.up", ack_wait=30.0, retry=None, max_deliver=5)
    async def held(event: Event, ctx: Context) -> None:
        calls.record(event, ctx)
        await gate.wait()

    first = worker_for(app, nats_config, grace=30.0)
    async with running(first) as [returned]:
        await event_bus.publish_event(node_up("busy"))
        await calls.wait_for(1)
        first.stop()
        late = node_up("late")
        await event_bus.publish_event(late)
        await anyio.sleep(0.5)  # the held handler's remaining work: the grace period in use
        gate.set()
        with anyio.fail_after(STOP_TIMEOUT):
            await returned.wait()

    dlq = DeadLetterQueue(event_bus)
    async with running(worker_for(app, nats_config)):
        with anyio.fail_after(HANDBACK_TIMEOUT):
            while not calls.of(late) and not [e async for e in dlq.entries()]:
                await anyio.sleep(0.05)
        records = [e.record async for e in dlq.entries()]

    assert [r.reason for r in records] == []
    [call] = calls.of(late)
    assert call.deliveries <= 2


@pytest.mark.parametrize("event_type", ["", "node up"], ids=["empty", "space"])
async def test_an_event_whose_type_is_no_subject_token_can_still_be_dead_lettered(
    nats_config: NATSConfig,
    event_bus: NATSEventBus,
    jetstream: JetStreamContext,
    event_type: str,
) -> None:
    """Given a handler that rejects what it gets,
    when a decodable event with type '' or 'node up' (from a buggy producer) lands on its
    subject,
    then the handler is called once and the event is dead-lettered, not redelivered forever."""
    app = App("svc", nats_config)
    calls = Calls()

    @app.on("node.up", retry=None, backoff=(0.05,))
    async def picky(event: Event, ctx: Context) -> None:
        calls.record(event, ctx)
        raise Reject(f"unknown type {event.type!r}")

    event = node_up()
    event.type = event_type
    async with running(worker_for(app, nats_config)):
        await jetstream.publish(nats_config.subject_for("node.up"), event.to_json())
        [record] = await dead_letters(event_bus, timeout=2.0)

    assert record.event == event
    assert len(calls.items) == 1


async def test_worker_exits_with_connection_failed_when_nats_is_gone_for_good(
    tmp_path: Path,
) -> None:
    """Given a worker whose reconnects are limited (1 attempt, 0.1 s apart),
    when its nats-server dies and stays down,
    then `run` ends with ConnectionFailed (so a supervisor restarts the process) instead of
    idling as if healthy."""
    with NATSServer(store_dir=tmp_path / "store") as server:
        config = NATSConfig(
            url=server.url, connect_timeout=1.0, reconnect_wait=0.1, max_reconnect_attempts=1
        )
        app = App("svc", config)

        @app.on("node.up")
        async def handle(event: Event) -> None:
            pass

        worker = Worker(app)
        with anyio.fail_after(15):
            try:
                async with anyio.create_task_group() as tg:
                    await tg.start(worker.run)
                    server.kill()
            except BaseExceptionGroup as group:
                failed, _ = group.split(ConnectionFailed)
            else:
                failed = None

    assert failed is not None, "run ended without ConnectionFailed"


async def test_a_worker_is_not_ready_while_the_server_does_not_answer_and_ready_once_it_does(
    tmp_path: Path,
) -> None:
    """Given a worker bound to its consumer, ready,
    when the server stops answering (SIGSTOP) with the connection still open, then goes on,
    then `not_ready()` (what /readyz answers) names the silence within a few seconds, long
    before the client's ping notices, and says ready again once the server answers."""
    with NATSServer(store_dir=tmp_path / "store") as server:
        app = App("svc", NATSConfig(url=server.url))

        @app.on("node.up")
        async def handle(event: Event) -> None:
            pass

        worker = worker_for(app, app.config)
        async with running(worker):
            assert worker.not_ready() is None
            async with frozen(server):
                why = await eventually(worker.not_ready, "not ready while frozen", timeout=10.0)
                assert "no answer from NATS" in why
                assert worker.not_ready() is not None
            await eventually(lambda: worker.not_ready() is None, "ready again", timeout=10.0)


async def test_a_graceful_stop_ends_within_its_grace_while_the_server_does_not_answer(
    tmp_path: Path,
) -> None:
    """Given a worker with a grace of 1 s, one handler call that ends within it and one that
    does not, on a server that stops answering (SIGSTOP) while they run,
    when the worker is stopped,
    then `run` returns within the grace and `CLOSE_S`: waiting on the server (the pull
    requests' drain, the last acks) counts against the grace instead of adding a
    `connect_timeout` or two to it, as a pod's termination period would not allow. Once the
    server goes on, the call that ended is acked, and the cancelled one is not lost: the next
    worker gets it, and only it (through the nak, or through the ack wait when the server
    drops the nak with the closed connection, which it may do)."""
    grace = 1.0
    with NATSServer(store_dir=tmp_path / "store") as server:
        config = NATSConfig(url=server.url, connect_timeout=5.0)
        app = App("svc", config)
        calls: list[tuple[str, int]] = []
        both_running = anyio.Event()

        @app.on("node.up", concurrency=2, ack_wait=2.0)
        async def handle(event: Event, ctx: Context) -> None:
            calls.append((event.subject, ctx.deliveries))
            if len(calls) == 2:
                both_running.set()
            if (event.subject, ctx.deliveries) == ("node-slow", 1):
                await anyio.sleep(60)

        worker = worker_for(app, config, grace=grace)
        async with anyio.create_task_group() as tg:
            returned = anyio.Event()

            async def run(*, task_status: anyio.abc.TaskStatus[None]) -> None:
                await worker.run(task_status=task_status)
                returned.set()

            await tg.start(run)
            async with await NATSEventBus.connect(config) as bus:
                for node in ("node-quick", "node-slow"):
                    await bus.publish_event(new_node_up_event("health-monitor", node))
            await both_running.wait()
            async with frozen(server):
                began = anyio.current_time()
                worker.stop()
                with anyio.fail_after(grace + CLOSE_S + 1.0):
                    await returned.wait()
                assert anyio.current_time() - began >= grace  # the slow call had its grace
        async with running(worker_for(app, config)):
            await eventually(lambda: len(calls) == 3, "the cancelled event back")
            info = await settled(config, "svc-handle")
        assert acked_up_to(info) == 2
        assert info.num_ack_pending == info.num_pending == 0
        assert calls[:2] in (
            [("node-quick", 1), ("node-slow", 1)],
            [("node-slow", 1), ("node-quick", 1)],
        )
        assert calls[2][0] == "node-slow"  # again, for the next worker; the quick one not


async def test_a_stop_while_the_server_does_not_answer_the_connect_returns_at_once(
    tmp_path: Path,
) -> None:
    """Given a worker starting against a server that does not answer (SIGSTOP) its connect,
    when the worker is stopped (a SIGTERM before it was ready),
    then `run` returns within 3 s, without an error: not after the 10 s connect timeout with
    `ConnectionFailed` (exit 4, as if NATS were down)."""
    with NATSServer(store_dir=tmp_path / "store") as server:
        app = App("svc", NATSConfig(url=server.url, connect_timeout=10.0))

        @app.on("node.up")
        async def handle(event: Event) -> None:
            pass

        worker = worker_for(app, app.config)
        async with frozen(server):
            with anyio.fail_after(3.0):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(worker.run)
                    await anyio.wait_all_tasks_blocked()  # run() waits for the server
                    worker.stop()


async def test_run_raises_connection_failed_itself_when_nats_cannot_be_reached() -> None:
    """Given a worker configured for a port where nothing listens,
    when it runs,
    then `run()` raises ConnectionFailed itself, not inside an ExceptionGroup, so a plain
    `except ConnectionFailed` catches it."""
    config = NATSConfig(url=f"nats://127.0.0.1:{free_port()}", connect_timeout=2.0)
    app = App("svc", config)

    @app.on("node.up")
    async def handle(event: Event) -> None:
        pass

    with pytest.raises(ConnectionFailed, match="cannot connect to NATS"):
        await Worker(app).run()


async def test_a_stream_of_another_shape_is_refused_not_reshaped(
    nats_config: NATSConfig, jetstream: JetStreamContext
) -> None:
    """Given a stream of the configured name that exists with other subjects (someone else's),
    when a worker starts,
    then it fails with ConfigError naming the stream and the missing subject, and the stream
    keeps its subjects."""
    await jetstream.add_stream(name=nats_config.stream_name, subjects=["other.things.>"])
    app = App("svc", nats_config)

    @app.on("node.up")
    async def handle(event: Event) -> None:
        pass

    with pytest.raises(ConfigError, match=rf"stream {nats_config.stream_name} exists with other"):
        await Worker(app).run()

    info = await jetstream.stream_info(nats_config.stream_name)
    assert info.config.subjects == ["other.things.>"]


async def test_a_stream_with_more_subjects_keeps_them(
    nats_config: NATSConfig, jetstream: JetStreamContext
) -> None:
    """Given the event stream exists with our subjects and one more (another service's),
    when a bus connects and sets the stream up,
    then the stream keeps both subjects."""
    subjects = [*nats_config.stream_subjects, "audit.>"]
    await jetstream.add_stream(name=nats_config.stream_name, subjects=subjects)

    async with await NATSEventBus.connect(nats_config):
        pass

    info = await jetstream.stream_info(nats_config.stream_name)
    assert sorted(info.config.subjects or []) == sorted(subjects)


async def test_a_consumer_the_worker_created_follows_the_handler_s_new_options(
    nats_config: NATSConfig, jetstream: JetStreamContext
) -> None:
    """Given a handler whose consumer a worker created with ack_wait 30 s,
    when the handler is changed to ack_wait 45 s and max_ack_pending 1500 and a worker starts,
    then the consumer has the new options: it is gdc-worker's own, so it follows the handler
    (a consumer another service created is bound as it is; see test_go_peer)."""
    for ack_wait, max_ack_pending in ((30.0, None), (45.0, 1500)):
        app = App("svc", nats_config)

        @app.on("node.up", ack_wait=ack_wait, max_ack_pending=max_ack_pending)
        async def handle(event: Event) -> None:
            pass

        async with running(worker_for(app, nats_config)):
            pass

    info = await jetstream.consumer_info(nats_config.stream_name, "svc-handle")
    assert (info.config.ack_wait, info.config.max_ack_pending) == (45.0, 1500)
    assert info.config.description == "gdc-worker"


@pytest.mark.parametrize(
    ("limits", "logged"),
    [
        ({"max_batch": 5}, "takes at most 5 per pull request"),
        ({"max_expires": 1_500_000_000}, "keeps a pull request 1.5s at most"),
    ],
    ids=["max_batch", "max_expires"],
)
async def test_a_consumer_that_limits_pull_requests_is_served_within_its_limits(
    nats_config: NATSConfig,
    event_bus: NATSEventBus,
    jetstream: JetStreamContext,
    caplog: pytest.LogCaptureFixture,
    limits: dict[str, int],
    logged: str,
) -> None:
    """Given a consumer another service created with limits on pull requests below what a
    worker asks for (a batch of 64, requests open for 30 s),
    when a worker serves it 40 events,
    then every event is handled and acked, the worker says what the server refused, and it
    asks again at a measured pace: it used to re-send each refused request at once, in a
    loop that handled nothing."""
    caplog.set_level(logging.INFO, "gdc_worker.bus")
    nc = await nats.connect(nats_config.url)
    requests = 0

    async def count(msg: object) -> None:
        nonlocal requests
        requests += 1

    try:
        await nc.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{nats_config.stream_name}.limited", cb=count)
        config = {
            "durable_name": "limited",
            "ack_policy": "explicit",
            "filter_subject": nats_config.subject_for("node.up"),
            **limits,
        }
        request = {"stream_name": nats_config.stream_name, "config": config}
        created = await nc.request(
            f"$JS.API.CONSUMER.CREATE.{nats_config.stream_name}.limited",
            json.dumps(request).encode(),
        )
        assert b'"error"' not in created.data, created.data
        events = node_ups(40)
        for event in events:
            await event_bus.publish_event(event)
        app = App("svc", nats_config)
        calls = Calls()

        @app.on("node.up", durable="limited")
        async def handle(event: Event) -> None:
            calls.record(event)

        async with running(worker_for(app, nats_config)):
            await calls.wait_for(len(events))
            info = await consumer_info(jetstream, nats_config.stream_name, "limited")
    finally:
        await nc.close()

    assert sorted(calls.ids) == sorted(e.id for e in events)
    assert (info.num_ack_pending, info.num_pending) == (0, 0)
    assert logged in caplog.text
    assert requests < 200, f"{requests} pull requests: refused ones were asked again in a loop"


# -- signals -------------------------------------------------------------------------------------


async def test_sighup_stops_a_worker_gracefully_as_sigterm_does(
    spawn: Spawn, event_bus: NATSEventBus, nats_config: NATSConfig, tmp_path: Path
) -> None:
    """Given a worker process whose handler takes 1 s, running two events,
    when it gets SIGHUP (its terminal or session went away),
    then both calls finish and are acked, and it exits 0: not killed with them unsettled."""
    out = tmp_path / "reports"
    env = worker_env(nats_config, GDC_TEST_OUT=str(out), GDC_TEST_SLEEP="1")
    worker = spawn("run", "tests.apps.recorder:app", env=env)
    await worker.ready()
    events = node_ups(2)
    for event in events:
        await event_bus.publish_event(event)
    await eventually(lambda: len(ids(out, "start")) == 2, "two handler calls started")

    worker.send(signal.SIGHUP)

    assert await worker.exit_code() == 0, worker.stderr
    assert sorted(ids(out, "done", worker.pid)) == sorted(e.id for e in events)
    info = await settled(nats_config, RECORDER_DURABLE)
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)


async def test_replicas_whose_supervisor_is_killed_finish_their_calls_and_stop(
    spawn: Spawn, event_bus: NATSEventBus, nats_config: NATSConfig, tmp_path: Path
) -> None:
    """Given `--processes 2` whose handler takes 1 s, both replicas running an event,
    when the supervisor is killed (SIGKILL: it cannot pass a stop on),
    then each replica notices within seconds, finishes its call, acks it and exits: none
    goes on consuming as an orphan that no supervisor stops."""
    out = tmp_path / "reports"
    env = worker_env(nats_config, GDC_TEST_OUT=str(out), GDC_TEST_SLEEP="1")
    supervisor = spawn("run", "tests.apps.recorder:app", "--processes", "2", env=env)
    replicas = await supervisor.ready(2)
    events = node_ups(4)
    for event in events:
        await event_bus.publish_event(event)
    await eventually(lambda: len(set(ids(out, "start"))) == 4, "four handler calls started")

    supervisor.send(signal.SIGKILL)

    await eventually(lambda: not any(alive(pid) for pid in replicas), "the replicas gone")
    assert sorted(ids(out, "done")) == sorted(e.id for e in events)
    info = await settled(nats_config, RECORDER_DURABLE)
    assert (info.num_pending, info.num_ack_pending) == (0, 0)
