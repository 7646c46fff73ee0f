"""The per-handler circuit breaker: its state machine on a fake clock, and an outage longer
than ack_wait against a real server, where no event may be burned."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import anyio
import pytest
from nats.js import JetStreamContext

from gdc_worker import (
    App,
    Breaker,
    Context,
    DeadLetterQueue,
    Event,
    HandlerDefinitionError,
    HandlerSpec,
    Hook,
    NATSConfig,
    NATSEventBus,
    Reject,
    Retry,
    Worker,
)
from gdc_worker.app import HandlerOptions, handler_spec
from gdc_worker.bus.pull import Delivery
from gdc_worker.hooks import Hooks
from gdc_worker.settle import ACK, Decision, Nak
from tests.support import GRACE, consumer_info, delivery, eventually, node_up, running

pytestmark = pytest.mark.anyio

EVENT = node_up()


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Transitions(Hook):
    """Notes each state a breaker reports, with when."""

    def __init__(self) -> None:
        self.states: list[tuple[str, float]] = []

    def breaker_changed(self, handler: HandlerSpec, state: str) -> None:
        self.states.append((state, time.monotonic()))

    def of(self) -> list[str]:
        return [state for state, _ in self.states]


SPEC = handler_spec(lambda event: None, "node.up", "svc-handle", HandlerOptions())


def bound(breaker: Breaker, hooks: Sequence[Hook] = ()) -> Breaker:
    breaker.bind(SPEC, Hooks(hooks))
    return breaker


def finish(breaker: Breaker, target: Delivery, error: BaseException | None) -> None:
    """What the runner's hooks tell the breaker once the handler was called for `target`."""
    breaker.call_started(SPEC, target, EVENT)
    breaker.call_finished(SPEC, target, EVENT, error, 0.001)
    decision: Decision = ACK if error is None else Nak(1.0)
    breaker.delivery_settled(SPEC, target, decision)


def settle(breaker: Breaker, error: BaseException | None) -> None:
    """One delivery through `breaker`, if it lets it in: called, ending with `error`."""
    target = delivery()
    if breaker.admit(target):
        finish(breaker, target, error)


def fail(breaker: Breaker, times: int = 1) -> None:
    for _ in range(times):
        settle(breaker, ConnectionError("dependency down"))


def test_it_opens_after_that_many_failed_deliveries_in_a_row() -> None:
    """Given Breaker(failures=3), when deliveries fail twice, succeed, then fail three times,
    then it stays closed until the third failure in a row, and then lets nothing through."""
    breaker = bound(Breaker(failures=3, clock=Clock()))

    fail(breaker, 2)
    settle(breaker, None)
    fail(breaker, 2)
    assert breaker.state == "closed"
    fail(breaker)

    assert breaker.state == "open"
    assert not breaker.admit(delivery())


def test_a_success_of_a_call_started_before_the_failures_does_not_end_them() -> None:
    """Given Breaker(failures=3) and a call A that started before the dependency went down,
    when calls B and C (started after A) fail, then A succeeds, then call D fails,
    then it opens on D: A was already running when the failures began, so its success says
    nothing about the dependency now (four calls at a time may settle in any order)."""
    breaker = bound(Breaker(failures=3, clock=Clock()))
    early, down = ConnectionError("dependency down"), delivery()
    a, b, c, d = delivery(), delivery(), delivery(), delivery()
    breaker.call_started(SPEC, a, EVENT)
    for failing in (b, c):
        finish(breaker, failing, early)
    breaker.call_finished(SPEC, a, EVENT, None, 0.001)
    breaker.delivery_settled(SPEC, a, ACK)
    assert breaker.state == "closed"

    finish(breaker, d, early)

    assert breaker.state == "open"
    assert not breaker.admit(down)


@pytest.mark.anyio
async def test_calls_cancelled_by_a_forced_stop_do_not_count() -> None:
    """Given Breaker(failures=2), when three calls are cancelled by a forced stop (each then
    handed back, settled as Nak(0)), then it stays closed: a stop says nothing about a
    dependency."""
    breaker = bound(Breaker(failures=2, clock=Clock()))

    for _ in range(3):
        target = delivery()
        breaker.call_started(SPEC, target, EVENT)
        breaker.call_finished(SPEC, target, EVENT, anyio.get_cancelled_exc_class()(), 0.001)
        breaker.delivery_settled(SPEC, target, Nak(0.0))

    assert breaker.state == "closed"


def test_retry_and_reject_do_not_count() -> None:
    """Given Breaker(failures=2), when deliveries end in Retry, Reject and one failure each,
    then it stays closed: only the handler's failures say a dependency is down."""
    breaker = bound(Breaker(failures=2, clock=Clock()))

    for error in (Retry(1.0), ConnectionError("down"), Reject("bad"), Retry(1.0)):
        settle(breaker, error)

    assert breaker.state == "closed"


def test_after_the_cooldown_one_trial_goes_and_its_success_closes_it() -> None:
    """Given an open Breaker(failures=1, cooldown=30), when 30 s pass,
    then one delivery goes through (half-open) and a second waits; when the trial succeeds,
    it is closed and every delivery goes through; the hooks saw open, half_open, closed."""
    clock, seen = Clock(), Transitions()
    breaker = bound(Breaker(failures=1, cooldown=30, clock=clock), [seen])
    fail(breaker)
    clock.now += 29.9
    assert not breaker.admit(delivery())

    clock.now += 0.1
    trial = delivery()
    assert breaker.admit(trial)
    assert breaker.state == "half_open"
    assert not breaker.admit(delivery())
    finish(breaker, trial, None)

    assert breaker.state == "closed"
    assert breaker.admit(delivery())
    assert seen.of() == ["open", "half_open", "closed"]


def test_a_failed_trial_opens_it_for_another_cooldown() -> None:
    """Given a half-open Breaker(cooldown=10), when the trial fails,
    then it is open again for 10 s from then."""
    clock = Clock()
    breaker = bound(Breaker(failures=1, cooldown=10, clock=clock))
    fail(breaker)
    clock.now += 10

    fail(breaker)  # the trial
    assert breaker.state == "open"
    clock.now += 9.9
    assert not breaker.admit(delivery())
    clock.now += 0.1
    assert breaker.admit(delivery())


def test_outcomes_of_calls_let_in_before_it_opened_change_nothing() -> None:
    """Given a half-open breaker whose trial is running, when a delivery let in before it
    opened succeeds, then it stays half-open: only the trial decides."""
    clock = Clock()
    breaker = bound(Breaker(failures=1, cooldown=1, clock=clock))
    earlier = delivery()
    assert breaker.admit(earlier)
    fail(breaker)
    clock.now += 1
    assert breaker.admit(delivery())  # the trial

    finish(breaker, earlier, None)

    assert breaker.state == "half_open"


def test_a_trial_ending_in_retry_lets_another_one_try() -> None:
    """Given a half-open breaker, when its trial ends in Retry (no verdict on the dependency),
    then it stays half-open and the next delivery is the trial."""
    clock = Clock()
    breaker = bound(Breaker(failures=1, cooldown=1, clock=clock))
    fail(breaker)
    clock.now += 1

    settle(breaker, Retry(0.5))

    assert breaker.state == "half_open"
    assert breaker.admit(delivery())


def test_a_trial_handed_back_before_its_call_lets_another_one_try() -> None:
    """Given a half-open breaker whose trial delivery is handed back before the handler was
    called (a forced stop while the consumer was resumed for it), then the next delivery is
    the trial: the breaker does not wait for a verdict that will never come."""
    clock = Clock()
    breaker = bound(Breaker(failures=1, cooldown=1, clock=clock))
    fail(breaker)
    clock.now += 1
    trial = delivery()
    assert breaker.admit(trial)

    breaker.delivery_settled(SPEC, trial, Nak(0.0))

    assert breaker.state == "half_open"
    assert breaker.admit(delivery())


def test_a_failure_ratio_within_the_window_opens_it() -> None:
    """Given Breaker(failures=100, ratio=0.5, window=10, min_calls=10), when 4 of 8
    deliveries fail, it stays closed (too few calls); when the 10th is the 5th failure, it
    opens; failures older than the window no longer count."""
    clock = Clock()
    breaker = bound(Breaker(failures=100, ratio=0.5, window=10, min_calls=10, clock=clock))
    for _ in range(4):
        settle(breaker, None)
        fail(breaker)
    assert breaker.state == "closed"
    settle(breaker, None)
    fail(breaker)
    assert breaker.state == "open"

    aged = bound(Breaker(failures=100, ratio=0.5, window=10, min_calls=4, clock=clock))
    fail(aged, 3)
    clock.now += 11
    for _ in range(3):
        settle(aged, None)
    fail(aged)
    assert aged.state == "closed"  # 1 of 4 within the window


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"failures": 0}, "failures must be a whole number >= 1, got 0"),
        ({"cooldown": 0}, "cooldown must be a positive number of seconds, got 0"),
        ({"ratio": 1.5}, "ratio must be in (0, 1], got 1.5"),
        ({"window": float("inf")}, "window must be a positive number of seconds, got inf"),
        ({"min_calls": True}, "min_calls must be a whole number >= 1, got True"),
    ],
)
def test_options_it_cannot_work_with_are_refused(options: dict[str, float], problem: str) -> None:
    """Given an option out of range, Breaker raises HandlerDefinitionError naming it."""
    with pytest.raises(HandlerDefinitionError, match=r"^breaker: ") as raised:
        Breaker(**options)  # type: ignore[arg-type]

    assert problem in str(raised.value)


def test_one_breaker_serves_one_handler(nats_config: NATSConfig) -> None:
    """Given a Breaker registered with one handler, when a second handler is given it too,
    then the second registration fails with a one-line error; something else than a Breaker
    is refused too."""
    app, breaker = App("svc", nats_config), Breaker()

    async def first(event: Event) -> None: ...
    async def second(event: Event) -> None: ...

    app.on("node.up", breaker=breaker)(first)

    with pytest.raises(HandlerDefinitionError, match="give each handler a Breaker of its own"):
        app.on("node.down", breaker=breaker)(second)
    with pytest.raises(HandlerDefinitionError, match="breaker must be a Breaker or None"):
        app.on("node.down", breaker=5)(second)  # type: ignore[arg-type]


async def test_waiters_are_let_through_when_the_trial_succeeds() -> None:
    """Given an open breaker with a short cooldown and two deliveries waiting for it,
    when the cooldown ends, then one of them goes (the trial) while the other waits, and
    once the trial succeeds the other goes too."""
    breaker = bound(Breaker(failures=1, cooldown=0.05))
    fail(breaker)
    let_through: list[Delivery] = []

    async def wait(target: Delivery) -> None:
        await breaker.admitted(target)
        let_through.append(target)

    first, second = delivery(), delivery()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait, first)
            tg.start_soon(wait, second)
            await eventually(lambda: let_through, "the trial let through")
            assert len(let_through) == 1
            assert breaker.state == "half_open"
            finish(breaker, let_through[0], None)

    assert {id(d) for d in let_through} == {id(first), id(second)}
    assert breaker.state == "closed"


@dataclass(frozen=True)
class Call:
    event_id: str
    deliveries: int
    state: str
    ok: bool


class Dependency:
    """What the handler calls: down for `outage_s` seconds from its `down_at`-th call."""

    def __init__(self, down_at: int, outage_s: float) -> None:
        self.down_at = down_at
        self.outage_s = outage_s
        self.calls = 0
        self.down_until = 0.0

    def call(self) -> None:
        self.calls += 1
        if self.calls == self.down_at:
            self.down_until = time.monotonic() + self.outage_s
        if time.monotonic() < self.down_until:
            raise ConnectionError("dependency down")


def assert_not_burned(event: Event, calls: Sequence[Call]) -> None:
    """`event` was handled once, and each delivery of it was a call: failed calls, then
    the one that succeeded, on deliveries 1, 2, 3..."""
    of_event = [c for c in calls if c.event_id == event.id]
    assert [c.ok for c in of_event] == [False] * (len(of_event) - 1) + [True], event.id
    assert [c.deliveries for c in of_event] == list(range(1, len(of_event) + 1)), event.id


def recording(
    breaker: Breaker, dependency: Dependency, calls: list[Call]
) -> Callable[[Event, Context], Awaitable[None]]:
    """A handler calling `dependency`, noting each call and the breaker's state as it was let in."""

    async def handle(event: Event, ctx: Context) -> None:
        state = breaker.state
        try:
            dependency.call()
        except ConnectionError:
            calls.append(Call(event.id, ctx.deliveries, state, ok=False))
            raise
        calls.append(Call(event.id, ctx.deliveries, state, ok=True))
        await anyio.sleep(0.001)

    return handle


async def test_an_outage_longer_than_ack_wait_burns_no_event(
    nats_config: NATSConfig,
    event_bus: NATSEventBus,
    jetstream: JetStreamContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Given a handler (ack_wait 2 s, 4 calls at a time) behind Breaker(failures=5,
    cooldown=1), whose dependency goes down for 6 s from its 200th call,
    when 1,000 events are published,
    then the breaker opens after 5 failed deliveries (and those already running), the
    dependency sees no call while it is open but one trial per cooldown, on 2.11+ the
    consumer is paused server-side meanwhile, every event is handled after the recovery,
    none is dead-lettered, nothing is left pending, and no event's delivery count grows while
    it waits: each call of an event has the delivery after its previous (failed) call, though
    deliveries waited at the breaker far longer than ack_wait.
    (max_deliver is high because failed trials are real failures of their event.)"""
    transitions = Transitions()
    breaker = Breaker(failures=5, cooldown=1.0)
    dependency = Dependency(down_at=200, outage_s=6.0)
    calls: list[Call] = []
    app = App("svc", nats_config, hooks=[transitions])

    app.on(
        "node.up",
        durable="svc-handle",
        ack_wait=2.0,
        retry=None,
        backoff=(0.1,),
        max_deliver=50,
        concurrency=4,
        breaker=breaker,
    )(recording(breaker, dependency, calls))

    events = [node_up(f"node-{n}") for n in range(1000)]
    paused_seen = False

    async def watch_pause() -> None:
        nonlocal paused_seen
        while True:
            info = await jetstream.consumer_info(nats_config.stream_name, "svc-handle")
            paused_seen = paused_seen or bool(info.paused)
            await anyio.sleep(0.1)

    with caplog.at_level(logging.INFO, logger="gdc_worker.breaker"):
        async with running(Worker(app, config=nats_config, grace=GRACE)):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_pause)
                for event in events:
                    await event_bus.publish_event_async(event)
                await event_bus.flush()
                await eventually(
                    lambda: {c.event_id for c in calls if c.ok} >= {e.id for e in events},
                    "every event handled",
                    timeout=60,
                )
                tg.cancel_scope.cancel()
            info = await consumer_info(jetstream, nats_config.stream_name, "svc-handle")

    assert (info.num_ack_pending, info.num_pending) == (0, 0)
    assert [entry async for entry in DeadLetterQueue(event_bus).entries()] == []
    states = transitions.of()
    assert len(states) >= 3
    assert states == ["open", "half_open"] * (len(states) // 2) + ["closed"]
    shut = transitions.states[-1][1] - transitions.states[0][1]
    assert shut > 2 * 2.0  # ack_wait: the held deliveries outlived it twice over

    failed_while_closed = [c for c in calls if not c.ok and c.state == "closed"]
    assert 5 <= len(failed_while_closed) <= 5 + 4 - 1
    assert [c for c in calls if c.state == "open"] == []
    assert len([c for c in calls if c.state == "half_open"]) == states.count("half_open")
    for event in events:
        assert_not_burned(event, calls)

    logged = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (
        logging.WARNING,
        "handler handle: circuit breaker open: 5 deliveries in a row failed, the last with "
        "ConnectionError: dependency down; no calls for 1s",
    ) in logged
    no_pause_api = [m for _, m in logged if "no consumer pause API" in m]
    assert paused_seen != bool(no_pause_api)  # paused server-side, else said why not (once)
    assert len(no_pause_api) <= 1


async def test_a_delivery_waiting_alone_at_the_breaker_is_kept_alive(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a handler (ack_wait 1 s) whose breaker opened on two failures, on a quiet stream
    where its pull requests stay open, and a cooldown of 3 s,
    when one more event arrives while it is open,
    then that event waits three ack_waits at the breaker without being delivered again, and
    is handled once, on its first delivery, when the trial succeeds."""
    breaker = Breaker(failures=2, cooldown=3.0)
    dependency = Dependency(down_at=1, outage_s=2.5)
    calls: list[Call] = []
    app = App("svc", nats_config)
    app.on(
        "node.up",
        durable="svc-handle",
        ack_wait=1.0,
        retry=None,
        backoff=(30.0,),
        concurrency=2,
        breaker=breaker,
    )(recording(breaker, dependency, calls))
    failing, waiting = node_up("failing-1"), node_up("waiting")

    async with running(Worker(app, config=nats_config, grace=GRACE)):
        await event_bus.publish_event(failing)
        await event_bus.publish_event(node_up("failing-2"))
        await eventually(lambda: breaker.state == "open", "the breaker open")
        await event_bus.publish_event(waiting)
        await eventually(lambda: breaker.state == "closed", "the breaker closed", timeout=30)
        await eventually(lambda: [c for c in calls if c.event_id == waiting.id], "handled")
        info = await consumer_info(
            jetstream, nats_config.stream_name, "svc-handle", until=lambda i: i.num_ack_pending == 2
        )

    assert_not_burned(waiting, calls)
    assert calls[-1].state == "half_open"  # it was the trial
    assert info.num_redelivered == 0  # the two failed ones wait for their 30 s backoff


async def test_the_bus_pauses_and_resumes_a_consumer_where_the_server_can(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a durable consumer, when the bus pauses it for 30 s and then resumes it,
    then on 2.11+ the server reports it paused, then not; before 2.11 the bus says it
    cannot (False, at once) and the consumer is untouched."""
    await event_bus.ensure_consumer("svc-handle", nats_config.subject_for("node.up"))

    with anyio.fail_after(5):
        supported = await event_bus.pause_consumer("svc-handle", 30)
    paused = (await jetstream.consumer_info(nats_config.stream_name, "svc-handle")).paused
    assert bool(paused) == supported
    assert await event_bus.pause_consumer("svc-handle", 0) == supported

    info = await jetstream.consumer_info(nats_config.stream_name, "svc-handle")
    assert not info.paused


async def test_a_pause_longer_than_the_calendar_pauses_for_as_long_as_it_can(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a durable consumer and a breaker cooldown past the year 9999 (1e12 s, say),
    when the bus pauses the consumer for it, then it is paused (as long as a date can say),
    not failed with an OverflowError that would end the worker."""
    await event_bus.ensure_consumer("svc-handle", nats_config.subject_for("node.up"))

    with anyio.fail_after(5):
        supported = await event_bus.pause_consumer("svc-handle", 1e12)

    paused = (await jetstream.consumer_info(nats_config.stream_name, "svc-handle")).paused
    assert bool(paused) == supported
