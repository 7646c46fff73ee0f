"""The in-memory `TestApp` settles as the real worker does: each scenario runs on both, against
the same config, and must give the same handler calls, settlements and dead-letter records."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import pytest

from gdc_worker import (
    App,
    Context,
    DeadLetterQueue,
    DeadLetterRecord,
    Decision,
    Delivery,
    Event,
    HandlerSpec,
    Hook,
    NATSConfig,
    NATSEventBus,
    Reject,
    Retry,
)
from gdc_worker.testing import TestApp
from tests.support import FAST_RETRY, node_up, running, settled, worker_for

pytestmark = pytest.mark.anyio

#: Nak delays short enough for the real server's run to take well under a second.
QUICK = (0.05,)


@dataclass
class Outcome:
    """What a user of either runs relies on: who was called on which delivery, how each
    delivery was settled, and the dead letters' meaningful fields (not times or sequences)."""

    calls: list[tuple[str, int]] = field(default_factory=list)
    settlements: list[tuple[str, int, Decision]] = field(default_factory=list)
    dead_letters: list[dict[str, object]] = field(default_factory=list)

    def note_dead_letters(self, records: list[DeadLetterRecord]) -> None:
        self.dead_letters = [
            {
                "reason": r.reason,
                "consumer": r.consumer,
                "handler": r.handler,
                "deliveries": r.deliveries,
                "error_type": r.error_type,
                "error_message": r.error_message,
                "event_id": r.event_id,
                "event_type": r.event_type,
                "stream": r.stream,
                "subject": r.subject,
                "data": r.data,
            }
            for r in records
        ]


class Settlements(Hook):
    """Notes how each delivery was settled."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome

    def delivery_settled(
        self, handler: HandlerSpec, delivery: Delivery, decision: Decision
    ) -> None:
        self.outcome.settlements.append((handler.name, delivery.deliveries, decision))


#: Registers a scenario's handler on an app; the handler notes its calls in the outcome.
Build = Callable[[App, Outcome], None]


def retry_then_succeed(app: App, outcome: Outcome) -> None:
    @app.on("node.up", retry=FAST_RETRY, backoff=QUICK)
    async def flaky(event: Event, ctx: Context) -> None:
        outcome.calls.append((event.id, ctx.deliveries))
        if len(outcome.calls) < 3:
            raise ConnectionError("upstream busy")


def nak_then_succeed(app: App, outcome: Outcome) -> None:
    @app.on("node.up", retry=None, backoff=QUICK)
    async def flaky(event: Event, ctx: Context) -> None:
        outcome.calls.append((event.id, ctx.deliveries))
        if ctx.deliveries == 1:
            raise ConnectionError("upstream busy")


def retry_later(app: App, outcome: Outcome) -> None:
    @app.on("node.up")
    async def not_yet(event: Event, ctx: Context) -> None:
        outcome.calls.append((event.id, ctx.deliveries))
        if ctx.deliveries < 3:
            raise Retry(0.1, "cluster not ready")


def rejected(app: App, outcome: Outcome) -> None:
    @app.on("node.up")
    async def refuse(event: Event, ctx: Context) -> None:
        outcome.calls.append((event.id, ctx.deliveries))
        raise Reject("node unknown")


def exhausted(app: App, outcome: Outcome) -> None:
    @app.on("node.up", max_deliver=3, retry=FAST_RETRY, backoff=QUICK)
    async def always_fails(event: Event, ctx: Context) -> None:
        outcome.calls.append((event.id, ctx.deliveries))
        raise ValueError("bad node")


def timed_out(app: App, outcome: Outcome) -> None:
    @app.on("node.up", timeout=0.2, retry=None, max_deliver=2, backoff=QUICK)
    async def too_slow(event: Event, ctx: Context) -> None:
        outcome.calls.append((event.id, ctx.deliveries))
        await anyio.sleep(10)


def outlives_ack_wait(app: App, outcome: Outcome) -> None:
    @app.on("node.up", ack_wait=1.0, retry=None)
    async def slow(event: Event, ctx: Context) -> None:
        outcome.calls.append((event.id, ctx.deliveries))
        await anyio.sleep(1.5)  # kept in progress meanwhile: not redelivered


def poison(app: App, outcome: Outcome) -> None:
    @app.on("node.up")
    async def never_called(event: Event, ctx: Context) -> None:
        outcome.calls.append((event.id, ctx.deliveries))


SCENARIOS: dict[str, Build] = {
    "retry_then_succeed": retry_then_succeed,
    "nak_then_succeed": nak_then_succeed,
    "retry_later": retry_later,
    "rejected": rejected,
    "exhausted": exhausted,
    "timed_out": timed_out,
    "outlives_ack_wait": outlives_ack_wait,
    "poison": poison,
}
POISON = b'{"not": "an event"}'


def app_for(build: Build, config: NATSConfig) -> tuple[App, Outcome]:
    outcome = Outcome()
    app = App("svc", config, hooks=[Settlements(outcome)])
    build(app, outcome)
    return app, outcome


async def on_a_server(
    build: Build, event: Event | None, config: NATSConfig, bus: NATSEventBus
) -> Outcome:
    app, outcome = app_for(build, config)
    (spec,) = app.handlers.values()
    async with running(worker_for(app, config)):
        if event is None:
            await bus.publish_raw(config.subject_for("node.up"), POISON, {})
        else:
            await bus.publish_event(event)
        info = await settled(config, spec.durable)
    assert (info.num_ack_pending, info.num_pending) == (0, 0)
    outcome.note_dead_letters([entry.record async for entry in DeadLetterQueue(bus).entries()])
    return outcome


async def in_memory(build: Build, event: Event | None, config: NATSConfig) -> Outcome:
    app, outcome = app_for(build, config)
    async with TestApp(app) as t:
        if event is None:
            await t.publish_raw(config.subject_for("node.up"), POISON)
        else:
            await t.publish(event)
        await t.join()
    outcome.note_dead_letters(t.dead_letters)
    return outcome


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_the_test_app_settles_as_the_worker_on_a_server(
    name: str, nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given a handler that succeeds after in-process retries, after a nak, after Retry(delay),
    rejects, fails until max_deliver, times out, runs past its ack_wait, or a message that is
    not an event,
    when the same event is run by the real worker on a server and by TestApp,
    then both call the handler on the same deliveries, settle each the same way, and leave
    the same dead-letter records."""
    build = SCENARIOS[name]
    event = None if name == "poison" else node_up(f"node-{name}")

    real = await on_a_server(build, event, nats_config, event_bus)
    memory = await in_memory(build, event, nats_config)

    assert memory == real
    assert real.settlements  # the scenario ran on the server at all
