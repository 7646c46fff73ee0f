"""Hooks: the seam cross-cutting features plug into, against a real server."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import anyio
import pytest
from nats.js import JetStreamContext

from gdc_worker import (
    Ack,
    App,
    Context,
    DeadLetter,
    Decision,
    Delivery,
    Event,
    HandlerDefinitionError,
    HandlerSpec,
    Hook,
    Nak,
    NATSConfig,
    NATSEventBus,
    PublishError,
    Reject,
    Worker,
)
from gdc_worker.hooks import Hooks
from tests.recording import ARRIVAL_TIMEOUT
from tests.support import FAST_RETRY, GRACE, consumer_info, dead_letters, node_up, running

pytestmark = pytest.mark.anyio


class Journal(Hook):
    """Notes every hook point as a tuple, in order."""

    def __init__(self) -> None:
        self.notes: list[tuple[object, ...]] = []

    def worker_ready(self, app: str, handlers: Sequence[HandlerSpec]) -> None:
        self.notes.append(("ready", app, tuple(h.name for h in handlers)))

    def worker_stopping(self, app: str) -> None:
        self.notes.append(("stopping", app))

    def delivery_received(self, handler: HandlerSpec, delivery: Delivery) -> None:
        self.notes.append(("received", handler.name, delivery.deliveries))

    def call_started(self, handler: HandlerSpec, delivery: Delivery, event: Event) -> None:
        self.notes.append(("started", event.subject, delivery.deliveries))

    def call_finished(
        self,
        handler: HandlerSpec,
        delivery: Delivery,
        event: Event,
        error: BaseException | None,
        duration_s: float,
    ) -> None:
        assert duration_s >= 0
        outcome = type(error).__name__ if error is not None else "ok"
        self.notes.append(("finished", event.subject, delivery.deliveries, outcome))

    def delivery_settled(
        self, handler: HandlerSpec, delivery: Delivery, decision: Decision
    ) -> None:
        self.notes.append(("settled", delivery.deliveries, type(decision).__name__))

    def of(self, kind: str) -> list[tuple[object, ...]]:
        return [note for note in self.notes if note[0] == kind]


class Broken(Hook):
    """Raises at every point it overrides."""

    def delivery_received(self, handler: HandlerSpec, delivery: Delivery) -> None:
        raise RuntimeError("metrics backend down")

    def delivery_settled(
        self, handler: HandlerSpec, delivery: Delivery, decision: Decision
    ) -> None:
        raise RuntimeError("metrics backend down")


async def test_hooks_see_each_step_of_success_retry_and_dead_letter(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given an app hook and a worker hook, a handler that fails once in process on event
    "flaky" and rejects event "bad",
    when "ok", "flaky" and "bad" are handled,
    then both hooks see the worker ready, each delivery received, each attempt started and
    finished with its outcome, each settlement with its decision, and the worker stopping."""
    app_hook, worker_hook = Journal(), Journal()
    app = App("svc", nats_config, hooks=[app_hook])
    failed: set[str] = set()

    @app.on("node.up", retry=FAST_RETRY, concurrency=1)
    async def handle(event: Event) -> None:
        if event.subject == "bad":
            raise Reject("bad node")
        if event.subject == "flaky" and "flaky" not in failed:
            failed.add("flaky")
            raise RuntimeError("once")

    async with running(Worker(app, config=nats_config, grace=GRACE, hooks=[worker_hook])):
        for node in ("ok", "flaky", "bad"):
            await event_bus.publish_event(node_up(node))
        await dead_letters(event_bus)

    for journal in (app_hook, worker_hook):
        assert journal.notes[0] == ("ready", "svc", ("handle",))
        assert journal.notes[-1] == ("stopping", "svc")
        assert journal.of("received") == [("received", "handle", 1)] * 3
        assert journal.of("finished") == [
            ("finished", "ok", 1, "ok"),
            ("finished", "flaky", 1, "RuntimeError"),
            ("finished", "flaky", 1, "ok"),
            ("finished", "bad", 1, "Reject"),
        ]
        assert len(journal.of("started")) == 4
        assert journal.of("settled") == [
            ("settled", 1, Ack.__name__),
            ("settled", 1, Ack.__name__),
            ("settled", 1, DeadLetter.__name__),
        ]


async def test_a_nak_is_reported_with_its_delay(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given a hook that keeps the decisions, and a handler failing its first delivery,
    when an event is handled,
    then the hook sees a Nak with the backoff's delay, then an Ack on delivery 2."""
    decisions: list[Decision] = []

    class Decisions(Hook):
        def delivery_settled(
            self, handler: HandlerSpec, delivery: Delivery, decision: Decision
        ) -> None:
            decisions.append(decision)

    app = App("svc", nats_config, hooks=[Decisions()])

    @app.on("node.up", retry=None, backoff=(0.05,))
    async def handle(event: Event, ctx: object) -> None:
        if len(decisions) == 0:
            raise RuntimeError("first delivery fails")

    async with running(Worker(app, config=nats_config, grace=GRACE)):
        await event_bus.publish_event(node_up())
        await _wait(lambda: len(decisions) >= 2)

    assert decisions == [Nak(0.05), Ack()]


async def test_a_raising_hook_never_breaks_settlement_and_is_logged_once(
    nats_config: NATSConfig,
    event_bus: NATSEventBus,
    jetstream: JetStreamContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Given a hook that raises in delivery_received and delivery_settled,
    when five events are handled,
    then all five are acked, and its error is logged once per method, not once per event."""
    app = App("svc", nats_config, hooks=[Broken()])
    handled: list[str] = []

    @app.on("node.up")
    async def handle(event: Event) -> None:
        handled.append(event.id)

    with caplog.at_level(logging.ERROR, logger="gdc_worker.hooks"):
        async with running(Worker(app, config=nats_config, grace=GRACE)):
            for n in range(5):
                await event_bus.publish_event(node_up(f"node-{n}"))
            info = await consumer_info(jetstream, nats_config.stream_name, "svc-handle")
            await _wait(lambda: len(handled) == 5)

    assert (info.num_ack_pending, info.num_pending) == (0, 0)
    assert len(handled) == 5
    failures = sorted(r.getMessage() for r in caplog.records if r.name == "gdc_worker.hooks")
    assert failures == [
        "hook Broken.delivery_received failed (reported once; the delivery goes on)",
        "hook Broken.delivery_settled failed (reported once; the delivery goes on)",
    ]


class Publishes(Hook):
    """Notes each event publish's outcome, and adds a header to each."""

    def __init__(self) -> None:
        self.outcomes: list[tuple[str, str, str]] = []

    def publishing(self, subject: str, event: Event, headers: dict[str, str]) -> None:
        headers["X-Seen-By"] = "journal"

    def published(
        self,
        subject: str,
        event: Event,
        outcome: str,
        error: BaseException | None,
        duration_s: float,
    ) -> None:
        assert (error is None) == (outcome != "failed")
        assert duration_s >= 0
        self.outcomes.append((event.subject, outcome, type(error).__name__ if error else ""))


async def test_publish_hooks_see_stored_duplicate_and_failed_publishes(
    nats_config: NATSConfig, jetstream: JetStreamContext
) -> None:
    """Given a bus with a hook on its publishes,
    when an event is published, published again (same id), published async, published async
    again, and one goes to a subject no stream captures,
    then the hook sees stored, duplicate, stored, duplicate and failed, and the header it
    added is stored with the event."""
    hook = Publishes()
    async with await NATSEventBus.connect(nats_config, hooks=[hook]) as bus:
        event = node_up("sync")
        seq = await bus.publish_event(event)
        await bus.publish_event(event)
        later = node_up("async")
        await bus.publish_event_async(later)
        await bus.publish_event_async(later)
        await bus.flush()
    async with await NATSEventBus.connect(
        nats_config.replace(stream_subjects=("nowhere.>",)), hooks=[hook], setup_stream=False
    ) as stray:
        with pytest.raises(PublishError):
            await stray.publish_event(node_up("lost"))

    assert hook.outcomes == [
        ("sync", "stored", ""),
        ("sync", "duplicate", ""),
        ("async", "stored", ""),
        ("async", "duplicate", ""),
        ("lost", "failed", "PublishRefused"),
    ]
    stored = await jetstream.get_msg(nats_config.stream_name, seq)
    assert stored.headers is not None
    assert stored.headers["X-Seen-By"] == "journal"


async def test_a_handlers_publishes_reach_the_worker_hooks(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given a worker hook on publishes and a handler that publishes one event per delivery,
    when two events are handled,
    then the hook sees both of the handler's publishes stored."""
    hook = Publishes()
    app = App("svc", nats_config)

    @app.on("node.up")
    async def relay(event: Event, ctx: Context) -> None:
        await ctx.publish(Event.new("node.down", "svc", event.subject, {}))

    async with running(Worker(app, config=nats_config, grace=GRACE, hooks=[hook])):
        for node in ("a", "b"):
            await event_bus.publish_event(node_up(node))
        await _wait(lambda: len(hook.outcomes) == 2)

    assert sorted(hook.outcomes) == [("a", "stored", ""), ("b", "stored", "")]


def test_only_the_methods_a_hook_overrides_are_called() -> None:
    """Given a hook overriding two points and a plain Hook,
    when they are registered,
    then only the points it overrides have a caller: a point nobody overrides is None, so
    the runner skips it without building its arguments."""
    hooks = Hooks([Broken(), Hook()])

    assert hooks.delivery_received is not None
    assert hooks.delivery_settled is not None
    assert hooks.call_started is hooks.call_finished is hooks.worker_ready is None


def test_something_that_is_not_a_hook_is_refused() -> None:
    """Given an object that is not a Hook subclass instance,
    when an App is created with it,
    then HandlerDefinitionError names it."""
    with pytest.raises(HandlerDefinitionError, match=r"is not a gdc_worker\.Hook"):
        App("svc", hooks=[object()])  # type: ignore[list-item]


async def _wait(done: Callable[[], bool], timeout: float = ARRIVAL_TIMEOUT) -> bool:
    """Poll `done()` until it holds; fail after `timeout`."""
    with anyio.fail_after(timeout):
        while not done():
            await anyio.sleep(0.02)
    return True
