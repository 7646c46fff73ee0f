"""TestApp: handlers run in memory on a virtual clock, with the worker's settlement."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import pytest

from gdc_worker import (
    App,
    Context,
    Decision,
    Delivery,
    Event,
    HandlerSpec,
    Hook,
    NATSConfig,
    PublishRefused,
    Reject,
    Retry,
    RetryPolicy,
    WorkerError,
    new_node_down_event,
)
from gdc_worker.testing import TestApp
from tests.support import node_up

pytestmark = pytest.mark.anyio


class Clock:
    """The test app a handler reads the virtual clock of."""

    test: TestApp | None = None

    @property
    def now(self) -> float:
        assert self.test is not None
        return self.test.now


async def test_a_five_delivery_backoff_runs_on_the_virtual_clock() -> None:
    """Given a handler that always fails, the default backoff (1, 5, 30, 60 s) and max_deliver 5,
    when an event is published and the test app joined,
    then the handler ran on deliveries 1 to 5 at virtual seconds 0, 1, 6, 36 and 96, and the
    event is dead-lettered on delivery 5, with no real wait for any of it."""
    app = App("svc")
    clock = Clock()
    calls: list[tuple[int, float]] = []

    @app.on("node.up", retry=None)
    async def fails(event: Event, ctx: Context) -> None:
        calls.append((ctx.deliveries, clock.now))
        raise ConnectionError("upstream down")

    async with TestApp(app) as t:
        clock.test = t
        await t.publish(node_up())
        await t.join()

    assert calls == [(1, 0.0), (2, 1.0), (3, 6.0), (4, 36.0), (5, 96.0)]
    assert [(r.reason, r.deliveries, r.error_type) for r in t.dead_letters] == [
        ("failed on delivery 5 of 5", 5, "ConnectionError")
    ]


async def test_publish_runs_what_is_due_now_and_advance_what_falls_due() -> None:
    """Given a handler that asks for a redelivery in 30 s the first time,
    when an event is published, then the clock advanced by 29 s, then by 1 s more,
    then the handler ran once after the publish, still once at 29 s, and again at 30 s."""
    app = App("svc")
    deliveries: list[int] = []

    @app.on("node.up")
    async def later(event: Event, ctx: Context) -> None:
        deliveries.append(ctx.deliveries)
        if ctx.deliveries == 1:
            raise Retry(30)

    async with TestApp(app) as t:
        await t.publish(node_up())
        after_publish = list(deliveries)
        await t.advance(29)
        at_29 = list(deliveries)
        await t.advance(1)

    assert (after_publish, at_29, deliveries) == ([1], [1], [1, 2])
    assert t.now == 30.0


async def test_in_process_retry_waits_run_on_the_virtual_clock() -> None:
    """Given a retry policy of three attempts 10 s apart and a handler that succeeds on its
    third, when an event is published and joined,
    then all three attempts ran on delivery 1 and the virtual clock moved at least 20 s."""
    app = App("svc")
    deliveries: list[int] = []

    @app.on("node.up", retry=RetryPolicy.attempts(3, initial=10, maximum=10))
    async def third_time_lucky(event: Event, ctx: Context) -> None:
        deliveries.append(ctx.deliveries)
        if len(deliveries) < 3:
            raise ConnectionError("not yet")

    async with TestApp(app) as t:
        await t.publish(node_up())
        await t.join()

    assert deliveries == [1, 1, 1]
    assert t.now >= 20.0
    assert t.dead_letters == []


async def test_join_fail_fast_reraises_the_error_an_event_was_dead_lettered_on() -> None:
    """Given a handler that rejects node-bad and fails once on node-flaky,
    when both are published and joined with fail_fast,
    then the Reject is raised inside the test (node-flaky's passing failure is not), once."""
    app = App("svc")

    @app.on("node.up", retry=None)
    async def check(event: Event, ctx: Context) -> None:
        if event.subject == "node-bad":
            raise Reject("unknown node")
        if ctx.deliveries == 1:
            raise ConnectionError("busy")

    async with TestApp(app) as t:
        await t.publish(node_up("node-flaky"))
        await t.publish(node_up("node-bad"))
        with pytest.raises(Reject, match="unknown node"):
            await t.join(fail_fast=True)
        await t.join(fail_fast=True)  # reported once

    assert [r.reason for r in t.dead_letters] == ["rejected: unknown node"]


async def test_join_without_fail_fast_keeps_errors_in_the_dead_letters() -> None:
    """Given a handler that rejects everything, when an event is joined without fail_fast,
    then nothing is raised and the dead letter names the rejection."""
    app = App("svc")

    @app.on("node.up")
    async def refuse(event: Event) -> None:
        raise Reject("no")

    async with TestApp(app) as t:
        await t.publish(node_up())
        await t.join()

    assert [(r.reason, r.consumer, r.handler) for r in t.dead_letters] == [
        ("rejected: no", "svc-refuse", "refuse")
    ]


class Journal(Hook):
    """Notes the hook points the test app calls."""

    def __init__(self) -> None:
        self.notes: list[tuple[object, ...]] = []

    def worker_ready(self, app: str, handlers: Sequence[HandlerSpec]) -> None:
        self.notes.append(("ready", app, tuple(h.name for h in handlers)))

    def worker_stopping(self, app: str) -> None:
        self.notes.append(("stopping", app))

    def call_finished(
        self,
        handler: HandlerSpec,
        delivery: Delivery,
        event: Event,
        error: BaseException | None,
        duration_s: float,
    ) -> None:
        self.notes.append(("finished", delivery.deliveries, type(error).__name__))

    def delivery_settled(
        self, handler: HandlerSpec, delivery: Delivery, decision: Decision
    ) -> None:
        self.notes.append(("settled", delivery.deliveries, type(decision).__name__))

    def published(
        self,
        subject: str,
        event: Event,
        outcome: str,
        error: BaseException | None,
        duration_s: float,
    ) -> None:
        self.notes.append(("published", event.type, outcome))


async def test_hooks_see_what_they_see_in_production() -> None:
    """Given an app with a hook and a handler that fails once, then publishes a node.down twice,
    when an event is published and joined,
    then the hook saw the app ready, each attempt and settlement, the publish stored and then
    found a duplicate (the same event id), and the app stopping."""
    journal = Journal()
    app = App("svc", hooks=[journal])
    down = new_node_down_event("svc", "node-1", "heartbeat lost")

    @app.on("node.up", retry=None, backoff=(2.0,))
    async def report(event: Event, ctx: Context) -> None:
        if ctx.deliveries == 1:
            raise ConnectionError("busy")
        await ctx.publish(down)
        await ctx.publish(down)

    async with TestApp(app) as t:
        await t.publish(node_up())
        await t.join()

    assert journal.notes == [
        ("ready", "svc", ("report",)),
        ("finished", 1, "ConnectionError"),
        ("settled", 1, "Nak"),
        ("published", "node.down", "stored"),
        ("published", "node.down", "duplicate"),
        ("finished", 2, "NoneType"),
        ("settled", 2, "Ack"),
        ("stopping", "svc"),
    ]
    assert t.published == [down, down]


async def test_a_ctx_publish_awaited_gives_the_sequence_it_is_stored_at() -> None:
    """Given a handler that awaits what ctx.publish returns,
    when an event is published (sequence 1),
    then the handler got sequence 2, the one its node.down is stored at."""
    app = App("svc")
    sequences: list[int | None] = []

    @app.on("node.up")
    async def report(event: Event, ctx: Context) -> None:
        pending = await ctx.publish(new_node_down_event("svc", event.subject, "lost"))
        sequences.append(await pending)

    async with TestApp(app) as t:
        assert await t.publish(node_up()) == 1
        await t.join()

    assert sequences == [2]


async def test_ctx_publish_reaches_the_matching_handlers_of_every_app() -> None:
    """Given a monitor app that turns node.up into node.down, and an alerts app with a handler
    on node.* and one on pin.*,
    when a node.up is published,
    then node.* saw the node.up and the node.down, pin.* nothing, and the trace id carried."""
    monitor, alerts = App("monitor"), App("alerts")
    seen: list[tuple[str, str]] = []

    @monitor.on("node.up")
    async def flip(event: Event, ctx: Context) -> None:
        await ctx.publish(new_node_down_event("monitor", event.subject, "flipped"))

    @alerts.on("node.*")
    async def nodes(event: Event) -> None:
        seen.append(("nodes", event.type))

    @alerts.on("pin.*")
    async def pins(event: Event) -> None:
        seen.append(("pins", event.type))

    async with TestApp(monitor, alerts) as t:
        await t.publish(node_up(trace_id="trace-1"))
        await t.join()

    assert seen == [("nodes", "node.up"), ("nodes", "node.down")]
    assert [(e.type, e.trace_id) for e in t.published] == [("node.down", "trace-1")]


async def test_two_apps_on_one_durable_are_refused() -> None:
    """Given two apps whose handlers share a durable name, when a test app is made of both,
    then WorkerError names the durable."""
    first, second = App("a"), App("b")

    @first.on("node.up", durable="shared")
    async def one(event: Event) -> None: ...

    @second.on("node.up", durable="shared")
    async def other(event: Event) -> None: ...

    with pytest.raises(WorkerError, match="durable 'shared'"):
        TestApp(first, second)


async def test_publishing_outside_the_block_says_how_to_use_it() -> None:
    """Given a test app not entered, when an event is published, then WorkerError says to use
    `async with`."""
    app = App("svc")

    @app.on("node.up")
    async def handle(event: Event) -> None: ...

    with pytest.raises(WorkerError, match="async with TestApp"):
        await TestApp(app).publish(node_up())


async def test_an_error_raised_inside_the_block_leaves_it_as_it_is() -> None:
    """Given a handler that always fails,
    when join(fail_fast=True) raises its error and nothing inside the block catches it,
    then it leaves `async with TestApp(...)` as that error, not wrapped in an ExceptionGroup,
    so `pytest.raises` around the block sees it."""
    app = App("svc")

    @app.on("node.up", retry=None)
    async def broken(event: Event) -> None:
        raise RuntimeError("dependency down")

    with pytest.raises(RuntimeError, match="dependency down"):  # noqa: PT012 - the block is the point
        async with TestApp(app) as t:
            await t.publish(node_up())
            await t.join(fail_fast=True)


async def test_a_publish_no_stream_captures_fails_as_publish_refused_as_on_a_server() -> None:
    """Given a test app on the default stream (gdc.events.>),
    when bytes are published to a subject outside it, then PublishRefused says no stream
    captures it, as the bus's publish does on a server."""
    async with TestApp(App("svc")) as t:
        with pytest.raises(PublishRefused, match=r"no stream captures elsewhere\.node\.up"):
            await t.publish_raw("elsewhere.node.up", b"{}")


def test_apps_on_another_stream_are_refused_not_left_without_events() -> None:
    """Given an app on the default stream and one configured for another stream,
    when both are put in one test app, then WorkerError names the apps and their streams:
    the second one's handlers would never be delivered the first one's events, nor could they
    publish to its stream."""
    billing = App("billing", NATSConfig(stream_name="BILLING", stream_subjects=("billing.>",)))

    with pytest.raises(WorkerError, match=r"app 'billing' is on stream BILLING \(billing\.>\)"):
        TestApp(App("svc"), billing)


async def test_an_event_over_the_servers_max_payload_is_refused() -> None:
    """Given a test app, when an event whose data takes over 1 MiB (nats-server's default
    max_payload) is published, then PublishRefused says so, as the bus's publish does: it would
    never be stored on a server."""
    app = App("svc")

    async with TestApp(app) as t:
        with pytest.raises(PublishRefused, match="max_payload of 1048576"):
            await t.publish(Event.new("node.up", "svc", "n", {"blob": "x" * (1 << 20)}))
        assert await t.publish(node_up()) == 1  # the refused one took no sequence


@pytest.mark.parametrize("seconds", [-1, math.nan, math.inf, "5", None])
async def test_advance_refuses_what_is_not_a_finite_number_of_seconds(seconds: object) -> None:
    """Given a test app, when advance() is given a negative, NaN, infinite or non-number value,
    then WorkerError says what it takes, and the clock has not moved."""
    async with TestApp(App("svc")) as t:
        with pytest.raises(WorkerError, match="a finite number of seconds >= 0"):
            await t.advance(seconds)  # type: ignore[arg-type]

    assert t.now == 0.0


@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit, asyncio.CancelledError])
async def test_fail_fast_raises_a_handlers_base_exception_as_a_worker_error(
    raised: type[BaseException],
) -> None:
    """Given a handler that raises KeyboardInterrupt, SystemExit or a CancelledError of its own,
    when its event is dead-lettered and the test app joined with fail_fast,
    then WorkerError names it, with the handler's exception as its cause: raised as it is it
    would stop the whole pytest run, or pass for the test's own cancellation."""
    app = App("svc")

    @app.on("node.up", retry=None, max_deliver=1)
    async def interrupted(event: Event) -> None:
        raise raised

    async with TestApp(app) as t:
        await t.publish(node_up())
        with pytest.raises(WorkerError, match=f"raised {raised.__name__}") as caught:
            await t.join(fail_fast=True)

    assert isinstance(caught.value.__cause__, raised)
    assert [r.error_type for r in t.dead_letters] == [raised.__name__]
