"""Typed handler payloads: a handler annotated with a payload struct gets the event's data
decoded into it, checked against the registry of payload types when it is declared."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from nats.js import JetStreamContext

from gdc_worker import (
    App,
    Context,
    Event,
    EventDataError,
    HandlerDefinitionError,
    HandlerSpec,
    NATSConfig,
    NATSEventBus,
    PinCompletedEvent,
    PinRequestedEvent,
    PlanReadyEvent,
    new_pin_requested_event,
    register_payload_type,
)
from tests.recording import Recording
from tests.support import consumer_info, dead_letters, node_up, running, worker_for

if TYPE_CHECKING:
    from gdc_worker import NATSServer  # only for the annotation of `typed_without_ctx_import`

PIN = PinRequestedEvent(cid="QmTyped", size=2048, policies=["rf-3"], priority=1)


class Invoice(msgspec.Struct):
    """A service's own payload type (registered for typedtest.invoiced below)."""

    invoice_id: str
    amount_cents: int = 0


class Refund(msgspec.Struct):
    """Another struct, that contradicts the registry for typedtest.invoiced."""

    refund_id: str = ""


register_payload_type("typedtest.invoiced", Invoice)


def _spec_of(pattern: str, handler: Callable[..., Any]) -> HandlerSpec:
    app = App("svc")
    app.on(pattern)(handler)
    return app.handlers[getattr(handler, "__name__", type(handler).__name__)]


# -- against a real server -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_typed_handler_gets_the_payload_and_the_envelope_in_ctx(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a handler annotated `pin: PinRequestedEvent, ctx: Context`,
    when a pin.requested event is published,
    then the handler gets the data as a PinRequestedEvent equal to the one published, ctx.event
    is the envelope (its id and trace id), and the event is acked."""
    app = App("svc", nats_config)
    seen: Recording[tuple[PinRequestedEvent, Event]] = Recording(lambda item: item[1])

    @app.on("pin.requested", retry=None)
    async def plan(pin: PinRequestedEvent, ctx: Context) -> None:
        seen.note((pin, ctx.event))

    event = new_pin_requested_event("api-gateway", PIN, trace_id="trace-typed")
    async with running(worker_for(app, nats_config)):
        await event_bus.publish_event(event)
        [(pin, envelope)] = await seen.wait_for(1)
        info = await consumer_info(jetstream, nats_config.stream_name, app.handlers["plan"].durable)

    assert isinstance(pin, PinRequestedEvent)
    assert pin == PIN
    assert (envelope.id, envelope.trace_id, envelope.type) == (
        event.id,
        "trace-typed",
        "pin.requested",
    )
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)


@pytest.mark.anyio
async def test_data_that_does_not_decode_is_dead_lettered_at_once_without_calling_the_handler(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a typed pin.requested handler with in-process retries and deliveries to spare,
    when a pin.requested event whose size is not a number arrives,
    then the handler is never called, the event is dead-lettered on its first delivery with a
    reason naming the field, and nothing is left to redeliver."""
    app = App("svc", nats_config)
    calls: list[PinRequestedEvent] = []

    @app.on("pin.requested", max_deliver=5)
    async def plan(pin: PinRequestedEvent) -> None:
        calls.append(pin)

    event = Event.new("pin.requested", "api-gateway", "QmBad", {"cid": "QmBad", "size": "big"})
    async with running(worker_for(app, nats_config)):
        await event_bus.publish_event(event)
        [record] = await dead_letters(event_bus)
        info = await consumer_info(jetstream, nats_config.stream_name, app.handlers["plan"].durable)

    assert calls == []
    assert (record.event_id, record.deliveries) == (event.id, 1)
    assert record.error_type == EventDataError.__name__
    assert record.reason.startswith("invalid event data: ")
    assert "$.size" in record.reason
    assert "PinRequestedEvent" in record.reason
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)


@pytest.mark.anyio
async def test_an_untyped_handler_still_gets_the_event(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given a handler annotated `event: Event` and one without an annotation, beside a typed
    one in the same app,
    when a node.up event is published,
    then both untyped handlers get the envelope itself, data as a dict."""
    app = App("svc", nats_config)
    seen: Recording[tuple[str, Event]] = Recording(lambda item: item[1])

    @app.on("node.up", retry=None)
    async def annotated(event: Event) -> None:
        seen.note(("annotated", event))

    @app.on("node.up", retry=None)
    async def bare(event, ctx):  # type: ignore[no-untyped-def]
        seen.note(("bare", event))

    @app.on("pin.requested", retry=None)
    async def typed(pin: PinRequestedEvent) -> None:
        pass

    event = node_up("node-typed")
    async with running(worker_for(app, nats_config)):
        await event_bus.publish_event(event)
        items = await seen.wait_for(2)

    assert sorted(name for name, _ in items) == ["annotated", "bare"]
    for _, got in items:
        assert isinstance(got, Event)
        assert (got.id, got.data) == (event.id, event.data)


# -- declaring typed handlers --------------------------------------------------------------------


async def typed_with_ctx(pin: PinRequestedEvent, ctx: Context) -> None:
    pass


async def typed_without_ctx_import(pin: PinRequestedEvent, ctx: NATSServer) -> None:
    pass


class TypedAuditor:
    """A callable object whose async `__call__` takes a payload."""

    async def __call__(self, pin: PinRequestedEvent) -> None:
        pass


def test_string_annotations_resolve_to_the_payload_type() -> None:
    """Given handlers whose annotations are strings (this module uses `from __future__ import
    annotations`), as a function, a callable object, or with a second parameter annotated
    with a name imported only for type checking,
    when they are declared,
    then each one's payload type is the struct its first parameter names."""
    assert isinstance(typed_with_ctx.__annotations__["pin"], str)
    for handler in (typed_with_ctx, typed_without_ctx_import, TypedAuditor()):
        assert _spec_of("pin.requested", handler).payload_type is PinRequestedEvent


def test_an_annotation_given_as_a_class_works_as_its_string() -> None:
    """Given a handler whose annotation is the class itself, not a string,
    when it is declared, then its payload type is that class."""

    async def handler(pin: Any) -> None:
        pass

    handler.__annotations__["pin"] = PinRequestedEvent

    assert _spec_of("pin.requested", handler).payload_type is PinRequestedEvent


def test_event_any_or_no_annotation_keep_the_envelope() -> None:
    """Given handlers annotated `Event`, `Any`, or not at all,
    when declared, then they have no payload type: they get the event as before."""

    async def event(event: Event) -> None:
        pass

    async def anything(event: Any) -> None:
        pass

    async def bare(event, ctx):  # type: ignore[no-untyped-def]
        pass

    for handler in (event, anything, bare):
        assert _spec_of("node.up", handler).payload_type is None


def test_an_unresolvable_annotation_is_refused_naming_it() -> None:
    """Given a handler annotated with a name its module does not define,
    when it is declared, then HandlerDefinitionError names the annotation and the parameter."""

    async def plan(pin: NoSuchPayload) -> None:  # type: ignore[name-defined]  # noqa: F821
        pass

    with pytest.raises(HandlerDefinitionError, match=r"'NoSuchPayload' of 'pin'"):
        App("svc").on("pin.requested")(plan)


class NodeUpEnvelope(Event):
    """An Event subclass: the envelope with a narrower name, not a payload."""


async def partial_typed(tag: str, pin: PinRequestedEvent, ctx: Context) -> None:
    pass


def test_a_partial_with_string_annotations_resolves_them_in_its_functions_module() -> None:
    """Given a functools.partial of a handler function whose annotations are strings,
    when it is declared, then its payload type is the struct its function's module names."""
    spec = _spec_of("pin.requested", functools.partial(partial_typed, "audit"))

    assert (spec.payload_type, spec.takes_context) == (PinRequestedEvent, True)


def test_an_event_subclass_annotation_is_refused_not_decoded_from_the_data() -> None:
    """Given a handler annotated with a subclass of Event,
    when it is declared, then HandlerDefinitionError says to annotate it Event (its data
    would never decode into an envelope, and each delivery would be dead-lettered)."""

    async def up(event: NodeUpEnvelope) -> None:
        pass

    with pytest.raises(HandlerDefinitionError, match=r"NodeUpEnvelope.*subclass of Event"):
        App("svc").on("node.up")(up)


def test_an_annotation_that_is_not_a_struct_is_refused() -> None:
    """Given a handler whose first parameter is annotated as a dict,
    when declared, then HandlerDefinitionError says to use Event or a msgspec Struct."""

    async def plan(pin: dict[str, Any]) -> None:
        pass

    with pytest.raises(HandlerDefinitionError, match=r"Event .* msgspec\.Struct"):
        App("svc").on("pin.requested")(plan)


@pytest.mark.parametrize(
    ("pattern", "named"),
    [
        pytest.param("pin.requested", "pin.requested carries PinRequestedEvent", id="type"),
        pytest.param("plan.*", "plan.failed carries PlanFailedEvent", id="pattern"),
        pytest.param(">", "pin.requested carries PinRequestedEvent", id="everything"),
        pytest.param("typedtest.invoiced", "typedtest.invoiced carries Invoice", id="custom"),
    ],
)
def test_an_annotation_contradicting_the_registry_is_refused_at_import(
    pattern: str, named: str
) -> None:
    """Given a handler annotated PlanReadyEvent,
    when it is declared for a type (or a pattern matching a type) whose events carry another
    struct, then HandlerDefinitionError names that type and its struct."""

    async def plan(ready: PlanReadyEvent) -> None:
        pass

    with pytest.raises(HandlerDefinitionError, match=named):
        App("svc").on(pattern)(plan)


def test_a_pattern_whose_registered_types_agree_takes_their_struct() -> None:
    """Given a pattern matching only types that carry the same struct (typedtest.invoiced), or
    an unregistered type,
    when a handler annotated with a struct is declared for it, then it is accepted."""

    async def bill(invoice: Invoice) -> None:
        pass

    async def refund(item: Refund) -> None:
        pass

    assert _spec_of("typedtest.*", bill).payload_type is Invoice
    assert _spec_of("typedtest.refunded", refund).payload_type is Refund


# -- what a handler is called with ---------------------------------------------------------------


def test_arguments_decode_a_custom_registered_type_and_pass_ctx_through() -> None:
    """Given a typed handler of a registered custom type that takes a context,
    when its arguments are built for an event, then they are the decoded struct and the
    context given."""

    async def bill(invoice: Invoice, ctx: Context) -> None:
        pass

    spec = _spec_of("typedtest.invoiced", bill)
    event = Event.new("typedtest.invoiced", "billing", "inv-1", {"invoice_id": "inv-1"})
    ctx: Any = object()

    assert spec.arguments(event, ctx) == (Invoice(invoice_id="inv-1"), ctx)


def test_arguments_of_an_untyped_handler_are_the_event_itself() -> None:
    """Given untyped handlers with and without a context,
    when their arguments are built, then they are the very event (and the context)."""

    async def alone(event: Event) -> None:
        pass

    async def with_ctx(event: Event, ctx: Context) -> None:
        pass

    event = node_up()
    ctx: Any = object()

    [got] = _spec_of("node.up", alone).arguments(event, None)
    assert got is event
    assert _spec_of("node.up", with_ctx).arguments(event, ctx) == (event, ctx)


def test_arguments_raise_an_event_data_error_naming_the_field() -> None:
    """Given a typed handler, when the event's data does not fit the struct,
    then building its arguments raises EventDataError naming the field."""
    spec = _spec_of("pin.requested", typed_with_ctx)
    event = Event.new("pin.requested", "api", "Qm", {"cid": "Qm", "policies": "rf-3"})

    with pytest.raises(EventDataError, match=r"\$\.policies"):
        spec.arguments(event, None)


def test_go_nulls_decode_as_zero_values() -> None:
    """Given pin.completed data as the Go bus writes a nil list (null),
    when a typed handler's arguments are built, then the list is empty."""

    async def done(pin: PinCompletedEvent) -> None:
        pass

    event = Event.new("pin.completed", "orch", "Qm", {"cid": "Qm", "assignments": None})

    assert _spec_of("pin.completed", done).arguments(event, None) == (PinCompletedEvent(cid="Qm"),)


# -- registering payload types -------------------------------------------------------------------


def test_registering_the_same_pair_again_does_nothing() -> None:
    """Given typedtest.invoiced registered with Invoice (this module, at import),
    when it is registered again with Invoice (a module imported twice), nothing is raised."""
    register_payload_type("typedtest.invoiced", Invoice)


@pytest.mark.parametrize(
    ("event_type", "struct_type", "message"),
    [
        pytest.param("typedtest.refund", dict, "msgspec.Struct subclass", id="not-a-struct"),
        pytest.param("typedtest.refund", Refund(), "msgspec.Struct subclass", id="an-instance"),
        pytest.param("typedtest.*", Refund, "without wildcards", id="a-pattern"),
        pytest.param("", Refund, "dot-separated", id="empty"),
        pytest.param(3, Refund, "dot-separated", id="not-a-string"),
        pytest.param("pin.requested", Refund, "already carry PinRequestedEvent", id="builtin"),
        pytest.param("typedtest.invoiced", Refund, "already carry Invoice", id="custom"),
        pytest.param("typedtest.envelope", Event, "the envelope", id="the-envelope"),
        pytest.param("typedtest.envelope", NodeUpEnvelope, "the envelope", id="an-envelope"),
    ],
)
def test_register_payload_type_refuses_what_cannot_hold(
    event_type: Any, struct_type: Any, message: str
) -> None:
    """Given a non-struct, an invalid event type, or a type that already carries another
    struct, when registered, then HandlerDefinitionError says which."""
    with pytest.raises(HandlerDefinitionError, match=message):
        register_payload_type(event_type, struct_type)


def test_registering_a_type_a_declared_handler_contradicts_is_refused_naming_it() -> None:
    """Given a handler of `typedlate.*` taking Refund, declared before any type it matches is
    registered,
    when typedlate.invoiced is registered with Invoice, then HandlerDefinitionError names the
    handler and its struct, and the registry is left as it was: the handler would otherwise
    be given each invoice decoded as a Refund."""
    app = App("svc")

    @app.on("typedlate.*")
    async def refund(item: Refund) -> None:
        pass

    with pytest.raises(
        HandlerDefinitionError, match=r"handler 'refund' of 'typedlate\.\*' takes Refund"
    ):
        register_payload_type("typedlate.invoiced", Invoice)
    register_payload_type("typedlate.refunded", Refund)  # one it agrees with is fine


def test_a_handler_that_is_gone_does_not_hold_back_a_registration() -> None:
    """Given an app with a handler of typedgone.invoiced taking Refund, no longer referenced,
    when typedgone.invoiced is registered with Invoice, then it is."""
    app = App("svc")

    @app.on("typedgone.invoiced")
    async def refund(item: Refund) -> None:
        pass

    del app, refund
    register_payload_type("typedgone.invoiced", Invoice)
