"""The event bus against a real nats-server: workflows, delivery guarantees, errors, reconnects."""

from __future__ import annotations

import gc
import re
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import msgspec
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg, StreamInfo

from gdc_worker import (
    AlertTriggeredEvent,
    Assignment,
    ConnectionFailed,
    Context,
    Event,
    EventType,
    ExecProgressEvent,
    HealthChangedEvent,
    NATSConfig,
    NATSEventBus,
    NATSServer,
    PinRequestedEvent,
    PlanReadyEvent,
    PolicyUpdatedEvent,
    PublishError,
    SubscriptionError,
    new_alert_resolved_event,
    new_alert_triggered_event,
    new_exec_completed_event,
    new_exec_progress_event,
    new_health_changed_event,
    new_node_down_event,
    new_node_up_event,
    new_pin_completed_event,
    new_pin_failed_event,
    new_pin_requested_event,
    new_plan_ready_event,
    new_policy_deleted_event,
    new_policy_updated_event,
    parse_event_data,
)
from gdc_worker.bus.connection import Client as FastClient
from gdc_worker.testing import isolated_config
from tests.recording import ARRIVAL_TIMEOUT, Recording
from tests.support import consumer_info, dead_letters, eventually, free_port, frozen

pytestmark = pytest.mark.anyio

TRACE_HEADER = "Gdc-Trace-Id"
MSG_ID_HEADER = "Nats-Msg-Id"


class Collector(Recording[Event]):
    """A handler that records the events it gets; tests wait on it with a deadline."""

    def __init__(self) -> None:
        super().__init__(lambda event: event)

    async def __call__(self, event: Event) -> None:
        self.note(event)

    @property
    def events(self) -> list[Event]:
        return self.items


async def stream_info(js: JetStreamContext, stream: str) -> StreamInfo:
    info: StreamInfo = await js.stream_info(stream)
    return info


def new_trace_id() -> str:
    return "trace-" + uuid.uuid4().hex[:16]


def node_up(node_id: str = "node-1") -> Event:
    return new_node_up_event("health-monitor", node_id)


# -- workflows ---------------------------------------------------------------------------------


def pin_workflow(trace_id: str) -> list[Event]:
    """The five events of one pin, in the order the services publish them."""
    cid = "QmWorkflow" + uuid.uuid4().hex[:8]
    assignments = [
        Assignment(node_id="node1", cluster_id="cluster1", zone_id="msk"),
        Assignment(node_id="node2", cluster_id="cluster2", zone_id="nn"),
    ]
    request = PinRequestedEvent(cid=cid, size=1024, policies=["rf-2"], requested_by="user123")
    plan = PlanReadyEvent(plan_id="plan-1", cid=cid, assignments=assignments, estimated_cost=10.5)
    step = ExecProgressEvent(workflow_id="wf-1", step_id="pin", status="running", progress=0.5)
    return [
        new_pin_requested_event("api-gateway", request, trace_id),
        new_plan_ready_event("scheduler", plan, trace_id),
        new_exec_progress_event("orchestrator", step, trace_id),
        new_exec_completed_event("orchestrator", "wf-1", {"pinned": 2}, trace_id),
        new_pin_completed_event("orchestrator", cid, assignments, trace_id),
    ]


async def test_pin_workflow_reaches_pattern_and_type_subscribers_with_one_trace_id(
    event_bus: NATSEventBus, jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given an auditor on `pin.*` and one subscriber per workflow event type,
    when the five pin workflow events are published with one trace id,
    then the auditor gets the pin.* events in order, each type subscriber gets its own event,
    and every event keeps the trace id, in its body and in the message header."""
    trace_id = new_trace_id()
    events = pin_workflow(trace_id)
    auditor = Collector()
    await event_bus.subscribe_to_pattern("pin.*", auditor)
    by_type = {event.type: Collector() for event in events}
    for event_type, collector in by_type.items():
        await event_bus.subscribe_to_event_type(event_type, collector)

    sequences = [await event_bus.publish_event(event) for event in events]

    pin_events = [event for event in events if event.type.startswith("pin.")]
    assert [e.type for e in pin_events] == [EventType.PIN_REQUESTED, EventType.PIN_COMPLETED]
    # pin.completed is published last, so once it is in, every earlier match is in too.
    await auditor.wait_for_event(events[-1])
    assert auditor.events == pin_events
    for event in events:
        assert await by_type[event.type].wait_for(1) == [event]
    received = auditor.events + [e for c in by_type.values() for e in c.events]
    assert {event.trace_id for event in received} == {trace_id}
    for sequence, event in zip(sequences, events, strict=True):
        stored: RawStreamMsg = await jetstream.get_msg(nats_config.stream_name, sequence)
        assert stored.headers is not None
        assert stored.headers[TRACE_HEADER] == trace_id
        assert stored.headers[MSG_ID_HEADER] == event.id


class NodeDown(msgspec.Struct):
    node_id: str
    reason: str


class NodeUp(msgspec.Struct):
    node_id: str


class PolicyDeleted(msgspec.Struct):
    policy_id: str
    deleted_by: str


class AlertResolved(msgspec.Struct):
    alert_id: str
    resolved_by: str


@dataclass(frozen=True)
class Expected:
    """A published event and the payload a subscriber parses out of it."""

    event: Event
    payload_type: type[msgspec.Struct]
    payload: msgspec.Struct


def health_monitoring(trace_id: str) -> list[Expected]:
    change = HealthChangedEvent(
        resource_type="node",
        resource_id="node-7",
        old_status="healthy",
        new_status="unhealthy",
        reason="heartbeat lost",
    )
    return [
        Expected(new_health_changed_event("monitor", change, trace_id), HealthChangedEvent, change),
        Expected(
            new_node_down_event("monitor", "node-7", "heartbeat lost", trace_id),
            NodeDown,
            NodeDown(node_id="node-7", reason="heartbeat lost"),
        ),
        Expected(new_node_up_event("monitor", "node-7", trace_id), NodeUp, NodeUp("node-7")),
    ]


def policy_management(trace_id: str) -> list[Expected]:
    update = PolicyUpdatedEvent(
        policy_id="rf-3",
        policy_name="three replicas",
        version=4,
        updated_by="admin",
        changes=["replication_factor: 2 -> 3"],
    )
    return [
        Expected(new_policy_updated_event("policy", update, trace_id), PolicyUpdatedEvent, update),
        Expected(
            new_policy_deleted_event("policy", "rf-3", "admin", trace_id),
            PolicyDeleted,
            PolicyDeleted(policy_id="rf-3", deleted_by="admin"),
        ),
    ]


def alerting(trace_id: str) -> list[Expected]:
    alert = AlertTriggeredEvent(
        alert_id="alert-9",
        alert_name="disk-usage",
        severity="critical",
        description="disk usage above 90%",
        labels={"node": "node-7", "zone": "msk"},
        value=0.93,
        threshold=0.9,
    )
    return [
        Expected(new_alert_triggered_event("alerts", alert, trace_id), AlertTriggeredEvent, alert),
        Expected(
            new_alert_resolved_event("alerts", "alert-9", "oncall", trace_id),
            AlertResolved,
            AlertResolved(alert_id="alert-9", resolved_by="oncall"),
        ),
    ]


@pytest.mark.parametrize("flow", [health_monitoring, policy_management, alerting])
async def test_flow_delivers_each_event_to_its_type_subscriber_with_its_payload(
    event_bus: NATSEventBus, flow: Callable[[str], list[Expected]]
) -> None:
    """Given a subscriber per event type of a flow,
    when the flow's events are published,
    then each subscriber gets exactly its event, unchanged, and parses the payload out of it."""
    trace_id = new_trace_id()
    expected = flow(trace_id)
    collectors = {item.event.type: Collector() for item in expected}
    for event_type, collector in collectors.items():
        await event_bus.subscribe_to_event_type(event_type, collector)

    for item in expected:
        await event_bus.publish_event(item.event)

    for item in expected:
        [received] = await collectors[item.event.type].wait_for(1)
        assert received == item.event
        assert received.trace_id == trace_id
        assert parse_event_data(received, item.payload_type) == item.payload


# -- delivery guarantees -----------------------------------------------------------------------


async def test_rapid_async_publishes_are_all_delivered_once_in_order(
    event_bus: NATSEventBus,
) -> None:
    """Given a subscriber,
    when 100 events are published with `publish_event_async` and then flushed,
    then the subscriber gets each of them exactly once, in publishing order."""
    collector = Collector()
    await event_bus.subscribe_to_event_type(EventType.EXEC_PROGRESS, collector)
    steps = [
        ExecProgressEvent(workflow_id="wf-1", step_id=f"step-{i}", status="running", progress=i)
        for i in range(100)
    ]
    events = [new_exec_progress_event("orchestrator", step) for step in steps]

    for event in events:
        await event_bus.publish_event_async(event)
    await event_bus.flush()
    sentinel = new_exec_progress_event("orchestrator", ExecProgressEvent(workflow_id="last"))
    await event_bus.publish_event(sentinel)

    await collector.wait_for_event(sentinel)
    assert collector.ids == [event.id for event in events] + [sentinel.id]


async def test_failing_handler_is_retried_until_it_succeeds_then_acked(
    event_bus: NATSEventBus, jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given a handler that raises on its first two calls,
    when an event is published,
    then the handler is called three times with it and the event ends up acknowledged."""
    calls: list[str] = []
    succeeded = anyio.Event()

    async def flaky(event: Event) -> None:
        calls.append(event.id)
        if len(calls) < 3:
            raise RuntimeError(f"transient failure {len(calls)}")
        succeeded.set()

    await event_bus.subscribe_to_event_type("node.up", flaky, durable="flaky")
    event = node_up()
    await event_bus.publish_event(event)

    # Two naks with a 1 s delay each come before the third call.
    with anyio.fail_after(ARRIVAL_TIMEOUT):
        await succeeded.wait()
    info = await consumer_info(jetstream, nats_config.stream_name, "flaky")
    assert (info.num_ack_pending, info.num_pending) == (0, 0)
    assert calls == [event.id] * 3


async def test_duplicate_publishes_are_stored_and_delivered_once(
    event_bus: NATSEventBus, jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given one event,
    when it is published twice with `publish_event` and once with `publish_event_async`,
    then the stream stores it once, the second publish returns the first's sequence,
    and the subscriber gets it once."""
    collector = Collector()
    await event_bus.subscribe_to_event_type("node.up", collector)
    event = node_up()

    first = await event_bus.publish_event(event)
    await event_bus.publish_event_async(event)
    await event_bus.flush()
    again = await event_bus.publish_event(event)

    assert again == first
    assert (await stream_info(jetstream, nats_config.stream_name)).state.messages == 1
    sentinel = node_up("node-2")
    await event_bus.publish_event(sentinel)
    await collector.wait_for_event(sentinel)
    assert collector.ids == [event.id, sentinel.id]


async def test_sync_handler_runs_in_a_worker_thread(
    event_bus: NATSEventBus, jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given a plain (non-async) handler,
    when an event is published,
    then the handler gets it in a thread other than the event loop's and the event is acked."""
    loop_thread = threading.get_ident()
    calls: list[tuple[str, int]] = []
    called = anyio.Event()

    def handler(event: Event) -> None:
        calls.append((event.id, threading.get_ident()))
        anyio.from_thread.run_sync(called.set)

    await event_bus.subscribe_to_event_type("node.up", handler, durable="sync")
    event = node_up()
    await event_bus.publish_event(event)

    with anyio.fail_after(ARRIVAL_TIMEOUT):
        await called.wait()
    [(event_id, thread)] = calls
    assert event_id == event.id
    assert thread != loop_thread
    info = await consumer_info(jetstream, nats_config.stream_name, "sync")
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_malformed_messages_are_dead_lettered_and_delivery_goes_on(
    event_bus: NATSEventBus, jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given a subscriber,
    when a non-JSON message and a JSON message that is not an event land on its subject,
    followed by a valid event,
    then the handler gets only the valid event, both bad messages are in the dead-letter
    stream with their bytes and the reason, and nothing is left unacknowledged."""
    collector = Collector()
    await event_bus.subscribe_to_event_type("node.up", collector, durable="malformed")
    subject = nats_config.subject_for("node.up")

    bad = [b"\x00 not json at all", b'{"id": 42, "type": ["node.up"]}']
    for raw in bad:
        await jetstream.publish(subject, raw)
    event = node_up()
    await event_bus.publish_event(event)

    # Delivery is in stream order, so both bad messages were handled before the event.
    await collector.wait_for_event(event)
    records = await dead_letters(event_bus, count=2)
    assert collector.events == [event]
    assert [(r.data, r.consumer, r.event_type) for r in records] == [
        (raw, "malformed", "invalid") for raw in bad
    ]
    assert all(r.reason.startswith("not a valid GDC event: ") for r in records)
    info = await consumer_info(jetstream, nats_config.stream_name, "malformed")
    assert (info.num_ack_pending, info.num_pending, info.num_redelivered) == (0, 0, 0)


async def test_a_pattern_subscriber_that_always_fails_dead_letters_after_max_deliver(
    event_bus: NATSEventBus, jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given a `pin.*` subscriber that always raises, with max_deliver 2, fast backoff and no
    in-process retries,
    when a pin event is published,
    then it is called on deliveries 1 and 2, and the event is dead-lettered with the error
    and the reason, not nak'd forever."""
    calls: list[int] = []

    async def always_fails(event: Event, ctx: Context) -> None:
        calls.append(ctx.deliveries)
        raise RuntimeError("the planner is down")

    await event_bus.subscribe_to_pattern(
        "pin.*", always_fails, durable="planner", max_deliver=2, backoff=[0.05], retry=None
    )
    event = new_pin_failed_event("scheduler", "QmX", "no capacity")
    await event_bus.publish_event(event)

    [record] = await dead_letters(event_bus)
    assert calls == [1, 2]
    assert (record.event, record.consumer, record.deliveries) == (event, "planner", 2)
    assert (record.error_type, record.error_message) == ("RuntimeError", "the planner is down")
    assert record.reason == "failed on delivery 2 of 2"
    info = await consumer_info(jetstream, nats_config.stream_name, "planner")
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_a_subscription_whose_consumer_is_deleted_stops_and_close_raises_it(
    nats_config: NATSConfig, jetstream: JetStreamContext
) -> None:
    """Given a bus with a subscription,
    when its durable consumer is deleted on the server,
    then closing the bus raises SubscriptionError naming the consumer, and subscribing again
    on that bus raises it too."""
    bus = await NATSEventBus.connect(nats_config)

    async def subscribe_again() -> str:
        """The error of a new subscription once the failure is known, polled."""
        with anyio.fail_after(ARRIVAL_TIMEOUT):
            while True:
                try:
                    await bus.subscribe_to_event_type("node.down", Collector())
                except SubscriptionError as exc:
                    return str(exc)
                await bus.unsubscribe_from_event_type("node.down")
                await anyio.sleep(0.05)

    try:
        await bus.subscribe_to_event_type("node.up", Collector(), durable="doomed")
        await jetstream.delete_consumer(nats_config.stream_name, "doomed")
        assert "consumer doomed: Consumer Deleted" in await subscribe_again()
    finally:
        with pytest.raises(SubscriptionError, match="consumer doomed: Consumer Deleted"):
            await bus.close()


async def test_unsubscribe_stops_delivery_and_the_durable_keeps_later_events(
    event_bus: NATSEventBus,
) -> None:
    """Given a subscription with a durable name that got one event,
    when it is unsubscribed, another event is published, and it subscribes again,
    then the old handler got only the first event and the new one gets the second promptly
    (it was neither lost nor held back for the 30 s ack wait)."""
    before = Collector()
    await event_bus.subscribe_to_event_type("policy.deleted", before, durable="policy-audit")
    first = new_policy_deleted_event("policy", "rf-1", "admin")
    await event_bus.publish_event(first)
    await before.wait_for(1)

    await event_bus.unsubscribe_from_event_type("policy.deleted")
    second = new_policy_deleted_event("policy", "rf-2", "admin")
    await event_bus.publish_event(second)
    after = Collector()
    await event_bus.subscribe_to_event_type("policy.deleted", after, durable="policy-audit")

    assert await after.wait_for(1, timeout=5.0) == [second]
    assert before.events == [first]


# -- subscriptions -----------------------------------------------------------------------------


async def test_subscribing_twice_to_a_pattern_fails_and_keeps_the_first(
    event_bus: NATSEventBus,
) -> None:
    """Given a subscription to `pin.*`,
    when the same bus subscribes to `pin.*` again,
    then it raises SubscriptionError and the first subscription still gets events."""
    first = Collector()
    await event_bus.subscribe_to_pattern("pin.*", first)

    with pytest.raises(SubscriptionError, match=r"already subscribed to 'pin\.\*'"):
        await event_bus.subscribe_to_pattern("pin.*", Collector())

    event = new_pin_requested_event("api-gateway", PinRequestedEvent(cid="QmTwice"))
    await event_bus.publish_event(event)
    assert await first.wait_for(1) == [event]


@pytest.mark.parametrize("pattern", ["pin..x", "a.>.b", "", "pin.", ".pin", "pin requested"])
async def test_invalid_pattern_is_refused(event_bus: NATSEventBus, pattern: str) -> None:
    """Given a connected bus,
    when it subscribes to a malformed pattern,
    then it raises SubscriptionError naming the pattern."""
    with pytest.raises(SubscriptionError, match=re.escape(repr(pattern))):
        await event_bus.subscribe_to_pattern(pattern, Collector())


@pytest.mark.parametrize(
    ("pattern", "durable"),
    [
        ("pin.requested", "gdc-consumer-pin-requested"),
        ("pin.*", "gdc-consumer-pin-star"),
        (">", "gdc-consumer-gt"),
    ],
)
async def test_default_durable_name_is_derived_from_the_pattern(
    event_bus: NATSEventBus,
    jetstream: JetStreamContext,
    nats_config: NATSConfig,
    pattern: str,
    durable: str,
) -> None:
    """Given no durable name,
    when the bus subscribes to a type or pattern,
    then the consumer is `gdc-consumer-<pattern made safe>`, filtering on the pattern's subject."""
    await event_bus.subscribe_to_pattern(pattern, Collector())

    info = await consumer_info(jetstream, nats_config.stream_name, durable)
    assert info.config.durable_name == durable
    assert info.config.filter_subject == nats_config.subject_prefix + pattern


async def test_default_durables_of_different_patterns_do_not_collide(
    event_bus: NATSEventBus, jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given a subscription to `pin.*` with the default durable,
    when the same bus also subscribes to `pin.>`,
    then each pattern has a consumer of its own (else they split one consumer's events)."""
    await event_bus.subscribe_to_pattern("pin.*", Collector())

    await event_bus.subscribe_to_pattern("pin.>", Collector())

    consumers = await jetstream.consumers_info(nats_config.stream_name)
    filters = sorted(info.config.filter_subject or "" for info in consumers)
    prefix = nats_config.subject_prefix
    assert filters == [prefix + "pin.*", prefix + "pin.>"]


async def test_closing_the_bus_leaves_no_unclosed_streams(nats_config: NATSConfig) -> None:
    """Given a bus with a subscription,
    when it is closed and dropped,
    then collecting it raises no ResourceWarning (which `filterwarnings = error` would turn
    into a failure of whichever test happens to run the garbage collector)."""
    bus = await NATSEventBus.connect(nats_config)
    await bus.subscribe_to_event_type("node.up", Collector())
    await bus.close()
    del bus

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()

    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []


# -- publishing --------------------------------------------------------------------------------


async def test_publish_event_stores_on_the_prefixed_subject_and_returns_the_sequence(
    event_bus: NATSEventBus, jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given a bus on a test stream (subjects `t<n>.events.>`),
    when two events are published,
    then they get sequences 1 and 2, each stored as `<prefix><type>` with the event as body."""
    assert re.fullmatch(r"t\d+\.events\.", nats_config.subject_prefix)
    events = [node_up(), new_node_down_event("health-monitor", "node-1", "reboot")]

    sequences = [await event_bus.publish_event(event) for event in events]

    assert sequences == [1, 2]
    for sequence, event in zip(sequences, events, strict=True):
        stored: RawStreamMsg = await jetstream.get_msg(nats_config.stream_name, sequence)
        assert stored.subject == nats_config.subject_prefix + event.type
        assert stored.data is not None
        assert Event.from_json(stored.data) == event


async def test_publishing_without_a_stream_raises_publish_error(
    event_bus: NATSEventBus, jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given a connected bus whose stream was deleted behind its back,
    when two events are published async and flushed, and one is published synchronously,
    then flush raises one PublishError naming both events (and a second flush has nothing to
    report), and publish_event raises PublishError naming the subject."""
    await jetstream.delete_stream(nats_config.stream_name)
    lost = [node_up("node-1"), node_up("node-2")]

    for event in lost:
        await event_bus.publish_event_async(event)
    with pytest.raises(PublishError, match=r"^2 event\(s\) were not stored") as failure:
        await event_bus.flush(timeout=2.0)
    for event in lost:
        assert event.id in str(failure.value)
    assert "no stream listens on the subject" in str(failure.value)
    await event_bus.flush(timeout=2.0)

    subject = nats_config.subject_for("node.up")
    with pytest.raises(PublishError, match=re.escape(subject)):
        await event_bus.publish_event(node_up("node-3"))


async def test_async_publish_to_a_stream_named_error_is_not_reported_failed(
    nats_config: NATSConfig, jetstream: JetStreamContext
) -> None:
    """Given a bus whose stream is named `error` (a valid stream name),
    when an event is published async and flushed,
    then flush reports nothing, as the event was stored."""
    config = nats_config.replace(stream_name="error")
    try:
        async with await NATSEventBus.connect(config) as bus:
            await bus.publish_event_async(node_up())
            await bus.flush()
    finally:
        await jetstream.delete_stream("error")


# -- connection --------------------------------------------------------------------------------


async def test_close_twice_is_harmless(nats_config: NATSConfig) -> None:
    """Given a connected bus with a subscription,
    when it is closed twice,
    then the second close does nothing and the bus is disconnected."""
    bus = await NATSEventBus.connect(nats_config)
    await bus.subscribe_to_event_type("node.up", Collector())

    await bus.close()
    await bus.close()

    assert not bus.connected


@pytest.mark.parametrize("max_reconnect_attempts", [10, 0])
async def test_unreachable_server_fails_fast_naming_the_url(max_reconnect_attempts: int) -> None:
    """Given a URL with nothing listening,
    when the bus connects (whatever the reconnect setting),
    then it raises ConnectionFailed naming the URL within the connect timeout."""
    url = f"nats://127.0.0.1:{free_port()}"
    config = NATSConfig(url=url, connect_timeout=1.0, max_reconnect_attempts=max_reconnect_attempts)
    bound = config.connect_timeout + 1.0

    started = time.monotonic()
    # The guard only keeps a hanging connect from waiting for the suite's timeout.
    with anyio.fail_after(bound), pytest.raises(ConnectionFailed, match=re.escape(url)):
        await NATSEventBus.connect(config)
    assert time.monotonic() - started < bound


async def test_delivery_resumes_after_the_server_restarts(tmp_path: Path) -> None:
    """Given a subscriber that got an event from a server with a persistent store,
    when the server is killed and started again on the same port and store,
    then an event published afterwards still reaches the subscriber."""
    with NATSServer(store_dir=tmp_path / "store") as server:
        config = NATSConfig(
            url=server.url, connect_timeout=5.0, reconnect_wait=0.2, max_reconnect_attempts=-1
        )
        async with await NATSEventBus.connect(config) as bus:
            collector = Collector()
            await bus.subscribe_to_event_type("node.up", collector)
            before = node_up("node-1")
            await bus.publish_event(before)
            await collector.wait_for_event(before)

            server.kill()
            await anyio.to_thread.run_sync(server.start)
            after = node_up("node-2")
            await bus.publish_event(after)

            await collector.wait_for_event(after, timeout=15.0)
            # At least once: an ack lost in the kill may bring `before` again, nothing else.
            assert set(collector.ids) == {before.id, after.id}


async def test_async_publish_acks_still_arrive_after_the_server_restarts(tmp_path: Path) -> None:
    """Given a bus whose async publishes were acked by a server with a persistent store,
    when the server is killed and started again on the same port and store,
    then the acks of the async publishes made afterwards arrive too (the ack inbox is
    subscribed again): flush reports nothing, and the stream holds every event once."""
    with NATSServer(store_dir=tmp_path / "store") as server:
        config = NATSConfig(
            url=server.url, connect_timeout=5.0, reconnect_wait=0.2, max_reconnect_attempts=-1
        )
        async with await NATSEventBus.connect(config) as bus:
            before = [node_up(f"node-{i}") for i in range(3)]
            for event in before:
                await bus.publish_event_async(event)
            await bus.flush()

            server.kill()
            await anyio.to_thread.run_sync(server.start)
            await eventually(lambda: bus.connected, "the bus reconnected", timeout=15.0)
            after = [node_up(f"node-{i}") for i in range(3, 6)]
            for event in after:
                await bus.publish_event_async(event)
            await bus.flush(timeout=15.0)

            stored = [
                m.headers[MSG_ID_HEADER] async for m in bus.stream_messages(config.stream_name)
            ]
            assert stored == [event.id for event in before + after]


@pytest.mark.parametrize(
    "raw",
    [
        b"Nats-Msg-Id: 6f1c2a4e\r\nGdc-Trace-Id: trace-1\r\n\r\n",
        b"A:1\r\nB:\t2 \r\n",
        b": empty name\r\nno colon\r\n\r\n",
        b"Bad Name: x\r\n\x1cLead: y\r\nTab\tIn: z\r\n",
        b"Caf\xc3\xa9: non-ascii name\r\nOk: caf\xc3\xa9 \xff\r\n",
        b"Dup: 1\r\nDup: 2\r\n",
        b"",
    ],
)
def test_header_parsing_matches_nats_py(raw: bytes) -> None:
    """Given raw header lines, the bus's faster parser yields exactly what nats-py's does."""
    assert FastClient._parse_header_lines(raw) == Client._parse_header_lines(raw)


class SentCommands(FastClient):
    """The bus's client, keeping the protocol commands it sends."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []

    async def _send_command(self, cmd: bytes, priority: bool = False) -> None:
        self.sent.append(cmd)  # nats-py's publish()
        await super()._send_command(cmd, priority)

    def _queue(self, command: bytes, size: int) -> None:
        self.sent.append(command)  # ours
        super()._queue(command, size)


@pytest.fixture
async def sent_commands(nats_config: NATSConfig) -> AsyncIterator[SentCommands]:
    nc = SentCommands()
    await nc.connect(nats_config.url)
    yield nc
    await nc.close()


@pytest.mark.parametrize(
    "headers",
    [
        {"Nats-Msg-Id": "6f1c2a4e", "Gdc-Trace-Id": "trace-1"},
        {" Padded ": "  both sides \t", "Crlf": "a\r\nb\rc\nd", "": "left out", "E": ""},
        {"Ok": "\u00fcber caf\u00e9"},
        {},
    ],
)
async def test_publish_block_sends_what_nats_py_publish_sends(
    sent_commands: SentCommands, headers: dict[str, str]
) -> None:
    """Given the bus's client connected to a real server,
    when a message is published with `header_block()` + `publish_block()` and with nats-py's
    `publish()`,
    then both send the same bytes; a subject with whitespace is refused as nats-py does."""
    nc = sent_commands
    await nc.publish_block("some.subject", "_INBOX.x.1", b"data", nc.header_block(headers))
    await nc.publish("some.subject", b"data", "_INBOX.x.1", headers=headers)

    assert nc.sent[-1] == nc.sent[-2]
    for bad in ("", "a subject", "a\r\nPING"):
        with pytest.raises(nats.errors.BadSubjectError):
            await nc.publish_block(bad, "_INBOX.x.1", b"data", nc.header_block(headers))


@pytest.mark.parametrize("reply", ["", "_INBOX.x.1"])
async def test_publish_now_sends_what_nats_py_publish_sends(
    sent_commands: SentCommands, reply: str
) -> None:
    """Given the bus's client connected to a real server,
    when a message without headers (an ack, a pull request) is published with `publish_now()`
    and with nats-py's `publish()`, with and without a reply subject,
    then both send the same bytes, and the server gets it (a flush round trip succeeds)."""
    nc = sent_commands
    nc.publish_now("$JS.ACK.x", b"+ACK", reply)
    await nc.publish("$JS.ACK.x", b"+ACK", reply)

    assert nc.sent[-1] == nc.sent[-2]
    await nc.flush(timeout=5)
    assert nc.stats["out_msgs"] == 2


@pytest.mark.parametrize("name", ["Bad Name", "Bad\r\nName", "Caf\u00e9", "a:b"])
async def test_header_block_refuses_the_names_nats_py_refuses(
    sent_commands: SentCommands, name: str
) -> None:
    """Given a header name nats-py refuses to send,
    then `header_block()` refuses it too, with the same `BadHeaderError`, every time."""
    with pytest.raises(nats.errors.BadHeaderError) as theirs:
        await sent_commands.publish("some.subject", b"data", headers={name: "x"})
    for _ in range(2):
        with pytest.raises(nats.errors.BadHeaderError) as ours:
            sent_commands.header_block({name: "x"})
        assert str(ours.value) == str(theirs.value)


async def test_a_server_list_connects_to_the_first_that_answers(
    nats_config: NATSConfig, nats_server: NATSServer
) -> None:
    """Given a url listing a port where nothing listens, then the test's server,
    when a bus connects,
    then it connects (to the second) and publishes, as Go's nats.Connect does with a list."""
    config = nats_config.replace(url=f"nats://127.0.0.1:{free_port()}, {nats_server.url}")

    async with await NATSEventBus.connect(config) as bus:
        seq = await bus.publish_event(node_up())

    assert seq == 1


async def test_connection_failed_never_shows_the_password() -> None:
    """Given a url with a password, to a port where nothing listens,
    when a bus connects,
    then ConnectionFailed names the server with the password as ***."""
    port = free_port()
    config = NATSConfig(url=f"nats://alice:s3cr3t@127.0.0.1:{port}", connect_timeout=2.0)

    with pytest.raises(ConnectionFailed) as raised:
        await NATSEventBus.connect(config)

    assert "s3cr3t" not in str(raised.value)
    assert f"nats://alice:***@127.0.0.1:{port}" in str(raised.value)


# -- setting up while JetStream does not answer (a cluster electing a leader) -------------------

#: Each JetStream request of these tests waits this long for its answer.
REQUEST_TIMEOUT = 0.5
#: A setup is asked again for up to this many request timeouts (`_SETUP_TIMEOUTS`).
SETUP_TIMEOUTS = 3
SETUPS: dict[str, Callable[[NATSEventBus], Coroutine[Any, Any, object]]] = {
    "stream": lambda bus: bus.ensure_stream(bus.event_stream, setup="create"),
    "consumer": lambda bus: bus.ensure_consumer("svc-handle", bus.config.subject_for("node.up")),
}


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[NATSServer]:
    """A nats-server of the test's own, which it may freeze."""
    with NATSServer(store_dir=tmp_path / "store") as server:
        yield server


async def set_up_on(server: NATSServer, what: str) -> NATSConfig:
    """Connect to `server` (creating the stream only if `what` is the consumer), and return
    the config; the caller sets `what` up."""
    config = isolated_config(server.url).replace(connect_timeout=REQUEST_TIMEOUT)
    if what == "consumer":
        async with await NATSEventBus.connect(config):
            pass
    return config


@pytest.mark.parametrize("what", SETUPS)
async def test_a_setup_that_got_no_answer_is_asked_again_and_done(
    own_server: NATSServer, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Given a server that stops answering (SIGSTOP) as a stream or a consumer is set up, as
    a cluster electing a leader may, or one that loses the answer to a create,
    when it answers again once the first request has timed out,
    then the setup is asked again and done: one warning says JetStream gave no answer, and
    the stream or consumer exists as asked."""
    config = await set_up_on(own_server, what)
    async with await NATSEventBus.connect(config, setup_stream=False) as bus:
        # The task group waits for the setup once the server goes on, at the end of `frozen`.
        async with anyio.create_task_group() as tg, frozen(own_server):
            tg.start_soon(SETUPS[what], bus)
            await eventually(lambda: "asking again" in caplog.text, "the setup asked again")

        nc = await nats.connect(own_server.url)
        try:
            js = nc.jetstream()
            stream = await js.stream_info(config.stream_name)
            consumers = [c.name for c in await js.consumers_info(config.stream_name)]
        finally:
            await nc.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert f"setting up {what} " in warnings[0]
    assert "no answer from JetStream" in warnings[0]
    assert stream.config.subjects == list(config.stream_subjects)
    assert consumers == (["svc-handle"] if what == "consumer" else [])


@pytest.mark.parametrize(
    ("what", "error", "named"),
    [
        ("stream", ConnectionFailed, "cannot set up stream"),
        ("consumer", SubscriptionError, "cannot create consumer svc-handle"),
    ],
)
async def test_a_setup_that_never_gets_an_answer_fails_after_asking_again(
    own_server: NATSServer, what: str, error: type[Exception], named: str
) -> None:
    """Given a server that stops answering (SIGSTOP) while connected,
    when a stream or a consumer is set up,
    then it is asked again for three request timeouts in all, then fails with the error
    the CLI turns into exit 4 (stream) or 1 (consumer), naming what it set up, and that
    JetStream gave no answer to any of its asks."""
    config = await set_up_on(own_server, what)
    bus = await NATSEventBus.connect(config, setup_stream=False)
    async with bus, frozen(own_server):
        started = time.monotonic()
        with pytest.raises(error, match=f"{named}.*no answer from JetStream, asked [23] times"):
            await SETUPS[what](bus)
        took = time.monotonic() - started

    assert took >= SETUP_TIMEOUTS * REQUEST_TIMEOUT
