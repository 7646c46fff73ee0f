"""OpenTelemetry tracing as a hook: `Tracing`, for the optional `otel` extra.

Every event publish gets a PRODUCER span whose W3C trace context (`traceparent`,
`tracestate`) travels in the message's headers, through the global textmap propagator. Every
delivery gets a CONSUMER span continuing the context its message carries (a root span when it
carries none, as the Go bus's events do: their `gdc.trace_id` still links the logs), current
from `delivery_received` to `delivery_settled`, so a handler's `ctx.publish` and its own spans
are its children. Attributes follow the messaging semantic conventions.

Only this module imports OpenTelemetry, and `import gdc_worker` does not import it.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError, describe
from .events import MSG_ID_HEADER, TRACE_HEADER
from .hooks import Hook
from .settle import DeadLetter, Nak

try:
    from opentelemetry import context, propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # the extra is not installed: Tracing() says how to get it
    _INSTALLED = False
else:
    _INSTALLED = True

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, TracerProvider
    from opentelemetry.util.types import AttributeValue

    from .app import HandlerSpec
    from .bus.pull import Delivery
    from .events import Event
    from .settle import Decision

__all__ = ["Tracing"]

# The messaging semantic conventions' attribute names, and gdc-worker's own.
SYSTEM = "messaging.system"
DESTINATION = "messaging.destination.name"
CONSUMER_GROUP = "messaging.consumer.group.name"
MESSAGE_ID = "messaging.message.id"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
TRACE_ID = "gdc.trace_id"
HANDLER = "gdc.handler"
DELIVERIES = "gdc.deliveries"
#: How a delivery was settled: `acked`, `nakd` or `dead_lettered` (the metrics' outcomes).
OUTCOME = "gdc.outcome"
#: How a publish ended: `stored`, `duplicate`, `queued` (in the outbox) or `failed`.
PUBLISH_OUTCOME = "gdc.publish.outcome"


@dataclass(slots=True)
class _Processing:
    """The CONSUMER span of the delivery a worker task is processing, and how to detach it."""

    delivery: Delivery
    span: Span
    token: contextvars.Token[Context]


class Tracing(Hook):
    """OpenTelemetry spans for deliveries and publishes: `App(..., hooks=[Tracing()])`.

    Spans go to `tracer_provider`, by default the global one the application configures
    (`opentelemetry.trace.set_tracer_provider`), even if it does so after creating this hook.
    Register it before other hooks that read the current span. Raises `ConfigError` when the
    `otel` extra is not installed.
    """

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        if not _INSTALLED:
            raise ConfigError(
                "tracing needs OpenTelemetry, which is not installed: "
                "pip install 'gdc-worker[otel]'"
            )
        self._tracer = trace.get_tracer("gdc_worker", tracer_provider=tracer_provider)
        # Per worker task (each processes one delivery at a time), hence a context variable.
        self._processing: contextvars.ContextVar[_Processing | None] = contextvars.ContextVar(
            f"gdc_worker.tracing.{id(self)}", default=None
        )
        # PRODUCER spans from `publishing` to `published`, by event id, oldest first.
        self._publishes: dict[str, list[Span]] = {}

    def delivery_received(self, handler: HandlerSpec, delivery: Delivery) -> None:
        """Start the delivery's CONSUMER span, child of the message's trace context, and make
        it current for the handler."""
        self._end_unsettled()
        parent = propagate.extract(delivery.headers)
        attributes: dict[str, AttributeValue] = {
            SYSTEM: "nats",
            DESTINATION: delivery.subject,
            CONSUMER_GROUP: handler.durable,
            OPERATION_TYPE: "process",
            OPERATION_NAME: "process",
            HANDLER: handler.name,
            DELIVERIES: delivery.deliveries,
        }
        # Until the event is decoded (it may not decode), what its headers say of it.
        for header, attribute in ((MSG_ID_HEADER, MESSAGE_ID), (TRACE_HEADER, TRACE_ID)):
            if header in delivery.headers:
                attributes[attribute] = delivery.headers[header]
        span = self._tracer.start_span(
            f"process {delivery.subject}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
        token = context.attach(trace.set_span_in_context(span, parent))
        self._processing.set(_Processing(delivery, span, token))

    def call_finished(
        self,
        handler: HandlerSpec,
        delivery: Delivery,
        event: Event,
        error: BaseException | None,
        duration_s: float,
    ) -> None:
        """Name the event on the span (the Go bus sends no headers), and record a failure."""
        processing = self._processing.get()
        if processing is None or processing.delivery is not delivery:
            return
        span = processing.span
        if event.trace_id:
            span.set_attributes({MESSAGE_ID: event.id, TRACE_ID: event.trace_id})
        else:
            span.set_attribute(MESSAGE_ID, event.id)
        if error is not None:
            span.record_exception(error)

    def delivery_settled(
        self, handler: HandlerSpec, delivery: Delivery, decision: Decision
    ) -> None:
        """End the CONSUMER span with its settlement (an error status unless acked), and
        detach its context."""
        processing = self._processing.get()
        if processing is None or processing.delivery is not delivery:
            return
        self._processing.set(None)
        try:
            span = processing.span
            span.set_attribute(OUTCOME, decision.outcome)
            if isinstance(decision, DeadLetter):
                span.set_status(Status(StatusCode.ERROR, f"dead-lettered: {decision.reason}"))
            elif isinstance(decision, Nak):
                span.set_status(Status(StatusCode.ERROR, f"nak: redelivery in {decision.delay:g}s"))
            span.end()
        finally:
            context.detach(processing.token)

    def publishing(self, subject: str, event: Event, headers: dict[str, str]) -> None:
        """Start the publish's PRODUCER span and put its trace context in the headers."""
        attributes: dict[str, AttributeValue] = {
            SYSTEM: "nats",
            DESTINATION: subject,
            MESSAGE_ID: event.id,
            OPERATION_TYPE: "send",
            OPERATION_NAME: "publish",
        }
        if event.trace_id:
            attributes[TRACE_ID] = event.trace_id
        span = self._tracer.start_span(
            f"publish {subject}", kind=SpanKind.PRODUCER, attributes=attributes
        )
        propagate.inject(headers, context=trace.set_span_in_context(span))
        self._publishes.setdefault(event.id, []).append(span)

    def published(
        self,
        subject: str,
        event: Event,
        outcome: str,
        error: BaseException | None,
        duration_s: float,
    ) -> None:
        """End the publish's PRODUCER span with its outcome."""
        spans = self._publishes.get(event.id)
        if not spans:
            return
        span = spans.pop(0)
        if not spans:
            del self._publishes[event.id]
        span.set_attribute(PUBLISH_OUTCOME, outcome)
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, describe(error)))
        span.end()

    def _end_unsettled(self) -> None:
        """End the span of a delivery this task took and never settled, and detach it.

        Every delivery the runner takes reaches `delivery_settled`, hand-backs included; this
        is the fallback for one that did not (a hook error, a defect), so that the next
        delivery on the same task never runs under the span that one left open.
        """
        left = self._processing.get()
        if left is None:
            return
        self._processing.set(None)
        try:
            left.span.set_status(
                Status(StatusCode.ERROR, "not settled (an internal error): handed back")
            )
            left.span.end()
        finally:
            context.detach(left.token)
