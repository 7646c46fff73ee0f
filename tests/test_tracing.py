"""OpenTelemetry tracing (`gdc_worker.tracing`) against a real server, with the SDK's
in-memory exporter behind the global tracer provider, as an application would configure it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from nats.js import JetStreamContext
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, SpanKind, StatusCode

from gdc_worker import (
    Ack,
    App,
    Context,
    Delivery,
    Event,
    HandlerSpec,
    Hook,
    NATSConfig,
    NATSEventBus,
    PublishError,
    Reject,
    Worker,
)
from gdc_worker.bus.connection import Client
from gdc_worker.tracing import Tracing
from tests.support import GRACE, dead_letters, eventually, node_up, running

pytestmark = pytest.mark.anyio

_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The spans the global tracer provider finished during the test."""
    if trace.get_tracer_provider() is not _PROVIDER:
        trace.set_tracer_provider(_PROVIDER)  # once per process, as an application does
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def finished(
    spans: InMemorySpanExporter, kind: SpanKind, count: int
) -> Callable[[], list[ReadableSpan] | None]:
    """A check for `eventually`: the finished spans of `kind` once there are `count`."""

    def check() -> list[ReadableSpan] | None:
        found = [span for span in spans.get_finished_spans() if span.kind is kind]
        return found if len(found) >= count else None

    return check


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def ids(context: SpanContext | None) -> tuple[int, int] | None:
    """A span context's (trace id, span id): `ids(span.context)`, `ids(span.parent)`."""
    return (int(context.trace_id), int(context.span_id)) if context is not None else None


async def test_one_trace_follows_an_event_through_a_handlers_publish(
    nats_config: NATSConfig, spans: InMemorySpanExporter, jetstream: JetStreamContext
) -> None:
    """Given a publisher and a worker with Tracing, a handler "relay" on node.up that publishes
    node.down through ctx.publish, and a handler "sink" on node.down,
    when node.up is published with trace id "t-1",
    then one trace chains publisher PRODUCER -> relay CONSUMER -> ctx.publish PRODUCER -> sink
    CONSUMER, each span carries the messaging attributes and gdc.trace_id, the relay sees
    its CONSUMER span as current, and each stored message holds its PRODUCER's traceparent."""
    app = App("svc", nats_config, hooks=[Tracing()])
    current: list[SpanContext] = []
    relayed: list[int | None] = []

    @app.on("node.up")
    async def relay(event: Event, ctx: Context) -> None:
        current.append(trace.get_current_span().get_span_context())
        relayed.append(await (await ctx.publish(Event.new("node.down", "svc", event.subject, {}))))

    @app.on("node.down")
    async def sink(event: Event) -> None:
        pass

    event = node_up(trace_id="t-1")
    async with (
        await NATSEventBus.connect(nats_config, hooks=[Tracing()]) as publisher,
        running(Worker(app, config=nats_config, grace=GRACE)),
    ):
        seq = await publisher.publish_event(event)
        consumers = await eventually(finished(spans, SpanKind.CONSUMER, 2), "both deliveries")

    by_group = {attributes(span)["messaging.consumer.group.name"]: span for span in consumers}
    relay_span, sink_span = by_group["svc-relay"], by_group["svc-sink"]
    first, second = sorted(
        (span for span in spans.get_finished_spans() if span.kind is SpanKind.PRODUCER),
        key=lambda span: span.start_time or 0,
    )
    assert first.parent is None
    assert ids(relay_span.parent) == ids(first.context)
    assert ids(second.parent) == ids(relay_span.context)
    assert ids(sink_span.parent) == ids(second.context)
    assert current == [relay_span.context]

    up = nats_config.subject_for("node.up")
    assert (first.name, relay_span.name) == (f"publish {up}", f"process {up}")
    assert attributes(first) == {
        "messaging.system": "nats",
        "messaging.destination.name": up,
        "messaging.message.id": event.id,
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "gdc.trace_id": "t-1",
        "gdc.publish.outcome": "stored",
    }
    assert attributes(relay_span) == {
        "messaging.system": "nats",
        "messaging.destination.name": up,
        "messaging.consumer.group.name": "svc-relay",
        "messaging.message.id": event.id,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "gdc.trace_id": "t-1",
        "gdc.handler": "relay",
        "gdc.deliveries": 1,
        "gdc.outcome": "acked",
    }
    assert relay_span.status.status_code is StatusCode.UNSET
    relayed_id = attributes(second)["messaging.message.id"]
    assert attributes(sink_span)["messaging.message.id"] == relayed_id
    assert attributes(second)["gdc.trace_id"] == attributes(sink_span)["gdc.trace_id"] == "t-1"

    for stored_seq, producer in ((seq, first), (relayed[0], second)):
        stored = await jetstream.get_msg(nats_config.stream_name, stored_seq)
        assert stored.headers is not None
        version, trace_id, parent_id, _flags = stored.headers["traceparent"].split("-")
        assert version == "00"
        assert (int(trace_id, 16), int(parent_id, 16)) == ids(producer.context)


async def test_an_event_without_trace_context_starts_a_trace_linked_by_its_trace_id(
    nats_config: NATSConfig, spans: InMemorySpanExporter, jetstream: JetStreamContext
) -> None:
    """Given a worker with Tracing,
    when an event with trace id "go-1" arrives without any header, as the Go bus sends it,
    then its CONSUMER span is a root span that names the event and its gdc.trace_id."""
    app = App("svc", nats_config, hooks=[Tracing()])

    @app.on("node.up")
    async def handle(event: Event) -> None:
        pass

    event = node_up(trace_id="go-1")
    async with running(Worker(app, config=nats_config, grace=GRACE)):
        await jetstream.publish(nats_config.subject_for("node.up"), event.to_json())
        [span] = await eventually(finished(spans, SpanKind.CONSUMER, 1), "the delivery's span")

    assert span.parent is None
    assert attributes(span)["messaging.message.id"] == event.id
    assert attributes(span)["gdc.trace_id"] == "go-1"
    assert attributes(span)["gdc.outcome"] == "acked"


async def test_an_upstream_trace_context_and_its_tracestate_carry_on(
    nats_config: NATSConfig, spans: InMemorySpanExporter, jetstream: JetStreamContext
) -> None:
    """Given a worker with Tracing and a handler that publishes node.down through ctx.publish,
    when node.up arrives with another service's traceparent and tracestate headers,
    then the delivery's span is the child of that remote span, and the event the handler
    publishes carries the same trace and tracestate on."""
    app = App("svc", nats_config, hooks=[Tracing()])
    relayed: list[int | None] = []

    @app.on("node.up")
    async def relay(event: Event, ctx: Context) -> None:
        relayed.append(await (await ctx.publish(Event.new("node.down", "svc", event.subject, {}))))

    trace_id, parent_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    upstream = {
        "traceparent": f"00-{trace_id:032x}-{parent_id:016x}-01",
        "tracestate": "vendor=opaque",
    }
    async with running(Worker(app, config=nats_config, grace=GRACE)):
        await jetstream.publish(
            nats_config.subject_for("node.up"), node_up().to_json(), headers=upstream
        )
        [span] = await eventually(finished(spans, SpanKind.CONSUMER, 1), "the delivery's span")

    assert ids(span.parent) == (trace_id, parent_id)
    assert span.parent is not None
    assert span.parent.is_remote
    stored = await jetstream.get_msg(nats_config.stream_name, relayed[0])
    assert stored.headers is not None
    assert stored.headers["traceparent"].split("-")[1] == f"{trace_id:032x}"
    assert stored.headers["tracestate"] == "vendor=opaque"


class CurrentSpans(Hook):
    """Notes, for each delivery, whether a span is current before Tracing makes its own."""

    def __init__(self) -> None:
        self.leaked: list[bool] = []

    def delivery_received(self, handler: HandlerSpec, delivery: Delivery) -> None:
        self.leaked.append(trace.get_current_span().get_span_context().is_valid)


async def test_no_context_outlives_a_dead_letter_a_poison_message_or_a_nak(
    nats_config: NATSConfig,
    event_bus: NATSEventBus,
    spans: InMemorySpanExporter,
    jetstream: JetStreamContext,
) -> None:
    """Given a worker with one worker task, a hook ahead of Tracing that looks at the current
    span, and a handler that rejects "bad" and fails "flaky" once,
    when a message that is no event, "bad", "flaky" and "ok" are handled in turn,
    then no delivery starts with a span left current by the one before, each CONSUMER span
    is the child of its own message's context (none for the poison message), and each ends
    with its settlement: dead-lettered and nak'd ones with an error status."""
    probe = CurrentSpans()
    app = App("svc", nats_config, hooks=[probe, Tracing()])
    failed: set[str] = set()

    @app.on("node.up", concurrency=1, retry=None, backoff=(0.05,))
    async def handle(event: Event) -> None:
        if event.subject == "bad":
            raise Reject("bad node")
        if event.subject == "flaky" and "flaky" not in failed:
            failed.add("flaky")
            raise RuntimeError("once")

    async with (
        await NATSEventBus.connect(nats_config, hooks=[Tracing()]) as publisher,
        running(Worker(app, config=nats_config, grace=GRACE)),
    ):
        await jetstream.publish(nats_config.subject_for("node.up"), b"\x00 not json")
        await dead_letters(event_bus)
        bad, flaky, ok = node_up("bad"), node_up("flaky"), node_up("ok")
        for event in (bad, flaky, ok):
            await publisher.publish_event(event)
        # poison, bad, flaky (nak'd), flaky again (acked), ok
        consumers = await eventually(finished(spans, SpanKind.CONSUMER, 5), "five deliveries")

    assert probe.leaked == [False] * 5
    assert trace.get_current_span().get_span_context().is_valid is False
    producers = {
        attributes(span)["messaging.message.id"]: ids(span.context)
        for span in spans.get_finished_spans()
        if span.kind is SpanKind.PRODUCER
    }
    names = {bad.id: "bad", flaky.id: "flaky", ok.id: "ok"}
    settled = {}
    for span in consumers:
        message_id = str(attributes(span).get("messaging.message.id", ""))
        assert ids(span.parent) == producers.get(message_id)
        key = (names.get(message_id, "poison"), attributes(span)["gdc.deliveries"])
        settled[key] = (attributes(span)["gdc.outcome"], span.status.status_code, span)
    assert {key: value[:2] for key, value in settled.items()} == {
        ("poison", 1): ("dead_lettered", StatusCode.ERROR),
        ("bad", 1): ("dead_lettered", StatusCode.ERROR),
        ("flaky", 1): ("nakd", StatusCode.ERROR),
        ("flaky", 2): ("acked", StatusCode.UNSET),
        ("ok", 1): ("acked", StatusCode.UNSET),
    }
    assert settled["bad", 1][2].status.description == "dead-lettered: rejected: bad node"
    nakd = settled["flaky", 1][2]
    assert nakd.status.description == "nak: redelivery in 0.05s"
    assert [event.attributes["exception.type"] for event in nakd.events if event.attributes] == [
        "RuntimeError"
    ]


async def test_a_delivery_left_unsettled_is_ended_when_its_task_takes_the_next(
    nats_config: NATSConfig, event_bus: NATSEventBus, spans: InMemorySpanExporter
) -> None:
    """Given two real deliveries and a Tracing hook,
    when the first is received and never settled (the runner hands a delivery back after an
    internal error without settling it), then the second is received and acked,
    then the first's span ends with an error status, the second's is a root span (its
    message carries no trace context), not the first's child, and no span stays current."""
    tracing = Tracing()
    app = App("svc", nats_config)

    @app.on("node.up")
    async def handle(event: Event) -> None:
        pass

    spec = app.handlers["handle"]
    for node in ("lost", "next"):
        await event_bus.publish_event(node_up(node))
    nc = Client()  # the bus's client, which a Delivery settles through
    await nc.connect(nats_config.url)
    try:
        pulled = await nc.jetstream().pull_subscribe(
            nats_config.subject_for("node.up"), "probe", stream=nats_config.stream_name
        )
        lost, following = (
            Delivery(nc, msg.subject, msg.reply, msg.data, msg.headers)
            for msg in await pulled.fetch(2)
        )
        tracing.delivery_received(spec, lost)
        tracing.delivery_received(spec, following)
        tracing.delivery_settled(spec, following, Ack())
    finally:
        await nc.close()

    first, second = spans.get_finished_spans()
    assert first.status.status_code is StatusCode.ERROR
    assert first.status.description == "not settled (an internal error): handed back"
    assert attributes(second)["gdc.outcome"] == "acked"
    assert second.parent is None
    assert trace.get_current_span().get_span_context().is_valid is False


async def test_each_publish_span_ends_with_its_outcome(
    nats_config: NATSConfig, spans: InMemorySpanExporter
) -> None:
    """Given buses with Tracing,
    when an event is published, published again (a duplicate), published async, and one goes
    to a subject no stream captures,
    then there is one PRODUCER span per publish, ended with its outcome, and the failed one
    has an error status naming the failure."""
    async with await NATSEventBus.connect(nats_config, hooks=[Tracing()]) as bus:
        event = node_up("sync")
        await bus.publish_event(event)
        await bus.publish_event(event)
        await bus.publish_event_async(node_up("async"))
        await bus.flush()
    async with await NATSEventBus.connect(
        nats_config.replace(stream_subjects=("nowhere.>",)), hooks=[Tracing()], setup_stream=False
    ) as stray:
        with pytest.raises(PublishError):
            await stray.publish_event(node_up("lost"))

    publishes = spans.get_finished_spans()
    outcomes = [
        (attributes(span)["gdc.publish.outcome"], span.status.status_code) for span in publishes
    ]
    assert outcomes == [
        ("stored", StatusCode.UNSET),
        ("duplicate", StatusCode.UNSET),
        ("stored", StatusCode.UNSET),
        ("failed", StatusCode.ERROR),
    ]
    assert (publishes[-1].status.description or "").startswith("PublishRefused: ")


def _python(code: str, *, without_opentelemetry: bool = False) -> str:
    """What `code` prints in a fresh interpreter (one where opentelemetry cannot be imported)."""
    if without_opentelemetry:
        code = "import sys; sys.modules['opentelemetry'] = None\n" + code
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.strip()


def test_importing_gdc_worker_imports_no_opentelemetry() -> None:
    """Given a fresh interpreter with OpenTelemetry installed,
    when gdc_worker is imported,
    then no opentelemetry module is: tracing costs nothing unless it is used."""
    code = (
        "import sys, gdc_worker\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    assert _python(code) == "[]"


def test_without_the_extra_tracing_says_how_to_install_it() -> None:
    """Given an interpreter where OpenTelemetry cannot be imported,
    when gdc_worker.tracing is imported and Tracing() created,
    then the import works and Tracing() raises ConfigError naming the extra to install."""
    code = (
        "from gdc_worker import ConfigError\n"
        "from gdc_worker.tracing import Tracing\n"
        "try:\n"
        "    Tracing()\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    assert _python(code, without_opentelemetry=True) == (
        "tracing needs OpenTelemetry, which is not installed: pip install 'gdc-worker[otel]'"
    )
