"""Handlers and publishers that misbehave, against a real server: whatever a handler raises, and
whatever lands on a subject, every delivery is settled and the worker lives on."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest
from nats.js import JetStreamContext

from gdc_worker import (
    App,
    Context,
    Event,
    EventDataError,
    NATSConfig,
    NATSEventBus,
    PinRequestedEvent,
    PublishError,
    PublishRefused,
    Reject,
    Retry,
    new_node_up_event,
    new_zone_up_event,
    parse_event_data,
)
from gdc_worker.app import MAX_ABANDONED_THREADS
from gdc_worker.events import MSG_ID_HEADER
from tests.support import (
    Calls,
    acked_up_to,
    consumer_info,
    dead_letters,
    eventually,
    node_up,
    running,
    worker_for,
)

pytestmark = pytest.mark.anyio


class Unprintable(Exception):
    """An exception whose message cannot be shown: its `__str__` raises."""

    def __str__(self) -> str:
        raise RuntimeError("no message for you")


class NotAnError(BaseException):
    """A BaseException that is neither an Exception nor one of Python's own."""


def _raise(exc: BaseException) -> None:
    raise exc


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: SystemExit(3), id="SystemExit"),
        pytest.param(lambda: KeyboardInterrupt(), id="KeyboardInterrupt"),
        pytest.param(lambda: NotAnError("odd"), id="BaseException-subclass"),
        pytest.param(lambda: Unprintable(), id="unprintable-message"),
        pytest.param(lambda: asyncio.CancelledError(), id="own-CancelledError"),
        pytest.param(lambda: GeneratorExit(), id="GeneratorExit"),
    ],
)
async def test_whatever_a_handler_raises_ends_in_a_dead_letter_and_the_worker_goes_on(
    nats_config: NATSConfig,
    event_bus: NATSEventBus,
    jetstream: JetStreamContext,
    make: object,
) -> None:
    """Given a handler that raises something that is not an ordinary Exception on its first
    two events (max_deliver 1),
    when three events are published,
    then the first two are dead-lettered naming the exception's type, the third is handled
    by the same worker, and nothing stays pending or unacknowledged."""
    app = App("svc", nats_config)
    calls = Calls()
    build = make  # a zero-argument callable building the exception
    assert callable(build)

    @app.on("node.up", max_deliver=1, retry=None)
    async def handle(event: Event) -> None:
        calls.record(event)
        if event.subject != "good":
            _raise(build())

    bad = [node_up("bad-1"), node_up("bad-2")]
    good = node_up("good")
    async with running(worker_for(app, nats_config)):
        for event in [*bad, good]:
            await event_bus.publish_event(event)
        records = await dead_letters(event_bus, count=2)
        await calls.wait_for_event(good)
        info = await consumer_info(jetstream, nats_config.stream_name, "svc-handle")

    expected_type = type(build()).__name__
    assert sorted(r.event.id for r in records if r.event) == sorted(e.id for e in bad)
    assert {r.error_type for r in records} == {expected_type}
    assert all("failed on delivery 1 of 1" in r.reason for r in records)
    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_a_handler_raising_its_own_cancelled_error_frees_its_slot(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given a handler with concurrency 1 that raises CancelledError on its first call,
    when a second event follows,
    then the first is nak'd and handled on its redelivery, and the second is handled too: the
    worker's only slot was not lost and the event was not held by the keep-alive."""
    app = App("svc", nats_config)
    calls = Calls()

    @app.on("node.up", concurrency=1, retry=None, backoff=(0.05,))
    async def handle(event: Event, ctx: Context) -> None:
        calls.record(event, ctx)
        if len(calls.items) == 1:
            raise asyncio.CancelledError

    first, second = node_up("first"), node_up("second")
    async with running(worker_for(app, nats_config)):
        await event_bus.publish_event(first)
        await event_bus.publish_event(second)
        await calls.wait_until(lambda items: {c.event.id for c in items} == {first.id, second.id})
        await calls.wait_until(lambda items: [c.deliveries for c in calls.of(first)] == [1, 2])


async def test_a_coroutine_a_handler_returns_unawaited_runs_before_the_event_is_settled(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given an async handler that returns its work's coroutine instead of awaiting it (a
    forgotten `await`), the work rejecting one event,
    when two events arrive,
    then the work runs for both before they are settled: the first is acked once done, the
    second dead-lettered with the work's reason; neither is acked with its work never run."""
    app = App("svc", nats_config)
    calls = Calls()

    async def work(event: Event, ctx: Context) -> None:
        calls.record(event, ctx)
        if event.data and event.data.get("node_id") == "bad":
            raise Reject("bad node")

    @app.on("node.up", retry=None)
    async def handle(event: Event, ctx: Context) -> Any:  # untyped code, as mypy would catch it
        return work(event, ctx)

    good, bad = node_up("good"), node_up("bad")
    async with running(worker_for(app, nats_config)):
        await event_bus.publish_event(good)
        await event_bus.publish_event(bad)
        [record] = await dead_letters(event_bus)
        info = await consumer_info(
            jetstream, nats_config.stream_name, "svc-handle", until=lambda i: acked_up_to(i) >= 2
        )

    assert sorted(calls.ids) == sorted([good.id, bad.id])
    assert (record.event_id, record.reason) == (bad.id, "rejected: bad node")
    assert (info.num_ack_pending, info.num_redelivered) == (0, 0)


async def test_an_exception_a_handler_returns_instead_of_raising_counts_as_raised(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given a handler that returns `Retry(...)` on the first delivery and `Reject(...)` on the
    second instead of raising them (a slip that type checkers do not catch in untyped code),
    when an event arrives,
    then it is redelivered, then dead-lettered with the rejection's reason: never acked as if
    the handler had succeeded."""
    app = App("svc", nats_config)
    calls = Calls()

    @app.on("node.up", retry=None)
    async def handle(event: Event, ctx: Context) -> Any:
        calls.record(event, ctx)
        return Retry(0.05) if ctx.deliveries == 1 else Reject("not this one")

    event = node_up()
    async with running(worker_for(app, nats_config)):
        await event_bus.publish_event(event)
        [record] = await dead_letters(event_bus)

    assert [c.deliveries for c in calls.items] == [1, 2]
    assert (record.event_id, record.reason) == (event.id, "rejected: not this one")


async def test_a_hung_plain_function_handler_with_a_timeout_leaves_a_bounded_number_of_threads(
    nats_config: NATSConfig, event_bus: NATSEventBus, caplog: pytest.LogCaptureFixture
) -> None:
    """Given a plain-function handler (timeout 0.05 s, redelivered at once) whose calls hang
    in their threads,
    when four events arrive and keep timing out and coming back,
    then once `MAX_ABANDONED_THREADS` calls are left running no new call starts: deliveries
    fail at once with a WorkerError naming the stuck threads, and the threads stop growing
    (each timed-out call used to leave one more, without bound)."""
    app = App("svc", nats_config)
    release = threading.Event()
    started: list[int] = []

    @app.on("zone.up", timeout=0.05, retry=None, max_deliver=10_000, backoff=[0.01])
    def hang(event: Event) -> None:
        started.append(1)
        release.wait(30)

    def refusals() -> int:
        return sum("still run in threads" in r.getMessage() for r in caplog.records)

    try:
        async with running(worker_for(app, nats_config)):
            for n in range(4):
                await event_bus.publish_event(new_zone_up_event("t", f"zone-{n}"))
            await eventually(lambda: refusals() > 0, "a call refused", timeout=20.0)
            calls = len(started)
            await eventually(lambda: refusals() > 40, "more calls refused")
            assert len(started) == calls <= MAX_ABANDONED_THREADS + 4
    finally:
        release.set()


async def test_data_that_does_not_fit_its_payload_type_is_dead_lettered_at_once(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given a handler that parses pin.requested data with parse_event_data, with in-process
    retries and deliveries to spare,
    when a pin.requested event whose size is not a number arrives,
    then the handler runs once and the event is dead-lettered on delivery 1, the reason naming
    the data error (a data error is permanent: no retry can fix it)."""
    app = App("svc", nats_config)
    calls = Calls()

    @app.on("pin.requested", max_deliver=5)
    async def plan(event: Event, ctx: Context) -> None:
        calls.record(event, ctx)
        parse_event_data(event, PinRequestedEvent)

    event = Event.new("pin.requested", "api-gateway", "QmBad", {"cid": "QmBad", "size": "big"})
    async with running(worker_for(app, nats_config)):
        await event_bus.publish_event(event)
        [record] = await dead_letters(event_bus)

    assert [c.deliveries for c in calls.items] == [1]
    assert (record.deliveries, record.error_type) == (1, EventDataError.__name__)
    assert record.reason.startswith("invalid event data: ")
    assert "$.size" in record.reason


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Status": "100"}, id="heartbeat-status"),
        pytest.param({"Status": "200"}, id="ok-status"),
        pytest.param({"Status": "404", "Description": "No Messages"}, id="404-status"),
        pytest.param({"Status": "409", "Description": "Consumer Deleted"}, id="consumer-deleted"),
    ],
)
async def test_an_event_with_a_status_header_is_handled_like_any_other(
    nats_config: NATSConfig,
    event_bus: NATSEventBus,
    jetstream: JetStreamContext,
    headers: dict[str, str],
) -> None:
    """Given a worker on node.up,
    when someone publishes an event carrying a `Status` header such as JetStream's own
    control messages have (heartbeat, 409 Consumer Deleted), then a plain event,
    then both are handled and acked, and the worker keeps running: only messages without a
    $JS.ACK reply are control messages."""
    app = App("svc", nats_config)
    calls = Calls()

    @app.on("node.up")
    async def handle(event: Event) -> None:
        calls.record(event)

    tricky, plain = node_up("tricky"), node_up("plain")
    async with running(worker_for(app, nats_config)) as [returned]:
        await jetstream.publish(
            nats_config.subject_for("node.up"), tricky.to_json(), headers=headers
        )
        await event_bus.publish_event(plain)
        await calls.wait_until(lambda items: {c.event.id for c in items} == {tricky.id, plain.id})
        info = await consumer_info(jetstream, nats_config.stream_name, "svc-handle")
        assert not returned.is_set(), "the worker stopped"

    assert (info.num_ack_pending, info.num_pending) == (0, 0)


async def test_an_async_handler_that_blocks_the_loop_is_named_in_one_warning(
    nats_config: NATSConfig, event_bus: NATSEventBus, caplog: pytest.LogCaptureFixture
) -> None:
    """Given an async handler that calls time.sleep(1.5), blocking the event loop,
    when it handles two events,
    then one warning names the handler and says the loop was blocked, and both are handled."""
    app = App("svc", nats_config)
    calls = Calls()

    @app.on("node.up", concurrency=1)
    async def sleepy(event: Event) -> None:
        time.sleep(1.5)  # noqa: ASYNC251 - the mistake under test
        calls.record(event)

    with caplog.at_level(logging.WARNING, logger="gdc_worker"):
        async with running(worker_for(app, nats_config)):
            events = [node_up("a"), node_up("b")]
            for event in events:
                await event_bus.publish_event(event)
            await calls.wait_for(2)

    blocked = [r.getMessage() for r in caplog.records if "blocked the event loop" in r.message]
    assert len(blocked) == 1, blocked
    assert blocked[0].startswith("handler sleepy blocked the event loop for over ")


@pytest.mark.parametrize(
    "event_type", ["pin.*", "pin.>", ">", "pin requested", "pin..x", "", "pin.requested\n"]
)
async def test_publishing_an_event_type_that_is_no_subject_is_refused_and_stores_nothing(
    event_bus: NATSEventBus, jetstream: JetStreamContext, nats_config: NATSConfig, event_type: str
) -> None:
    """Given an event whose type is a wildcard or not a valid subject token,
    when it is published (sync or async),
    then PublishError names the type and nothing is stored."""
    event = new_node_up_event("health-monitor", "node-1")
    event.type = event_type

    with pytest.raises(PublishError, match="cannot be published"):
        await event_bus.publish_event(event)
    with pytest.raises(PublishError, match="cannot be published"):
        await event_bus.publish_event_async(event)

    info = await jetstream.stream_info(nats_config.stream_name)
    assert info.state.messages == 0


async def test_an_event_over_max_payload_is_refused_and_the_connection_survives(
    event_bus: NATSEventBus, jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given an event whose JSON fits max_payload but not with its headers,
    when it is published (sync or async),
    then PublishError says it is over max_payload, nothing is stored, and the next event is
    published on the same connection (the server would have closed it)."""
    event = new_node_up_event("health-monitor", "node-1")
    room = event_bus.max_payload - len(event.to_json())
    event.data = {"node_id": "node-1", "pad": "x" * (room - 30)}
    assert len(event.to_json()) <= event_bus.max_payload

    with pytest.raises(PublishError, match="over the server's max_payload"):
        await event_bus.publish_event(event)
    with pytest.raises(PublishError, match="over the server's max_payload"):
        await event_bus.publish_event_async(event)
    seq = await event_bus.publish_event(node_up())

    info = await jetstream.stream_info(nats_config.stream_name)
    assert (seq, info.state.messages) == (1, 1)


async def test_an_event_exactly_at_max_payload_with_its_headers_is_stored_one_byte_more_is_not(
    event_bus: NATSEventBus, jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given an event whose JSON and header block together are exactly max_payload bytes,
    when it is sent, then it is stored; the same event one byte larger is refused at once
    with PublishError naming its size, and nothing more is stored."""
    event = new_node_up_event("health-monitor", "node-1")
    event.data = {"node_id": "node-1", "pad": ""}
    block = f"NATS/1.0\r\n{MSG_ID_HEADER}: {event.id}\r\n\r\n".encode()
    room = event_bus.max_payload - len(block) - len(event.to_json())
    event.data = {"node_id": "node-1", "pad": "x" * room}

    assert await (await event_bus.send_event(event)) == 1
    event.data = {"node_id": "node-1", "pad": "x" * (room + 1)}
    with pytest.raises(PublishError, match=f"{event_bus.max_payload + 1} bytes with headers"):
        await event_bus.send_event(event)

    info = await jetstream.stream_info(nats_config.stream_name)
    assert info.state.messages == 1


async def test_a_header_name_nats_refuses_is_refused_at_once_and_stores_nothing(
    event_bus: NATSEventBus, jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given headers with a name NATS does not allow (a space in it),
    when a message is published with them, then PublishRefused names the header at once and
    nothing is stored."""
    subject = nats_config.subject_for("node.up")

    with pytest.raises(PublishRefused, match=r"refused: BadHeaderError.*'Bad Name'"):
        await event_bus.publish_raw(subject, b"{}", {"Bad Name": "x"})

    info = await jetstream.stream_info(nats_config.stream_name)
    assert info.state.messages == 0
