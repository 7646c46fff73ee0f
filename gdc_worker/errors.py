"""The exception tree: every error gdc-worker raises on purpose derives from `GDCWorkerError`.

Each class says who raises it. `Retry` and `Reject` (in `retry`) are not errors but a
handler's own decisions, so they stand outside the tree.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = [
    "ConfigError",
    "ConnectionFailed",
    "DeadLetterNotFound",
    "DeadLetterUnreadable",
    "EventBusError",
    "EventDataError",
    "EventDecodeError",
    "EventError",
    "GDCWorkerError",
    "HandlerDefinitionError",
    "NATSServerError",
    "OutboxFull",
    "PublishError",
    "PublishRefused",
    "RefusedEventNotFound",
    "SubscriptionError",
    "TargetError",
    "WorkerError",
    "describe",
    "leaves",
    "message_of",
    "one_error",
]


class GDCWorkerError(Exception):
    """Root of all errors raised by gdc-worker."""


class ConfigError(GDCWorkerError, ValueError):
    """Raised by `NATSConfig` for a setting that is invalid, and by a feature whose optional
    extra is not installed (`Tracing`); the message names it."""


class HandlerDefinitionError(GDCWorkerError, TypeError):
    """Raised at import time by `App`, `@app.on(...)` and `register_payload_type` for a handler
    or a payload type that cannot work."""


class TargetError(GDCWorkerError):
    """Raised by `gdc-worker run TARGET` when TARGET names no importable `App`."""


class WorkerError(GDCWorkerError):
    """Raised by `Worker` when it cannot run as asked (e.g. an unknown handler name)."""


class EventError(GDCWorkerError, ValueError):
    """An event or its payload does not have the expected shape."""


class EventDecodeError(EventError):
    """Raised by `Event.from_json` when the bytes are not a valid GDC event."""


class EventDataError(EventError):
    """Raised by `parse_event_data` when the event's data does not fit the payload type.

    Raised inside a handler, it is a permanent failure: the event is dead-lettered at once.
    """


class EventBusError(GDCWorkerError):
    """Base of the errors raised by `NATSEventBus`."""


class ConnectionFailed(EventBusError):
    """The NATS server could not be reached, JetStream is not available there, or the
    connection was lost for good (reconnects exhausted)."""


class PublishError(EventBusError):
    """Raised by the bus's publish methods: one or more events were not stored by JetStream."""


class PublishRefused(PublishError):
    """Raised by the bus's publish methods for an event JetStream will not take however often
    it is sent: no stream captures its subject, JetStream refuses the request, or it is over
    the server's max_payload."""


class OutboxFull(PublishError):
    """Raised by the bus's publish methods when an event would go to the outbox and it already
    holds `outbox_max_events` events or `outbox_max_bytes` bytes: the event is not stored."""


class RefusedEventNotFound(GDCWorkerError, LookupError):
    """Raised by `Outbox.requeue` for an id that is not in the outbox's refused table."""


class SubscriptionError(EventBusError):
    """A subscription could not be created, was asked for with an invalid pattern, or its
    consumer can no longer deliver (deleted, or turned into a push consumer)."""


class DeadLetterNotFound(GDCWorkerError, LookupError):
    """Raised by `DeadLetterQueue` for an id with no record."""


class DeadLetterUnreadable(GDCWorkerError, ValueError):
    """Raised by `DeadLetterEntry.record` and `DeadLetterQueue.replay` for a message in the
    dead-letter stream that is not a record gdc-worker wrote, and by `replay` for a record
    stored by reference whose original is gone from the event stream."""


class NATSServerError(GDCWorkerError):
    """The embedded `nats-server` could not be found, started or stopped."""


def message_of(exc: BaseException) -> str:
    """`str(exc)`, or a stand-in when the exception's own `__str__` fails."""
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__} whose message cannot be shown>"


def describe(exc: BaseException) -> str:
    """`Type: message` for an error (just `Type` when its message says nothing more)."""
    text = message_of(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text and text != name else name


def one_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error to raise for what task groups raised together (`Worker.run`, the CLI).

    A lost connection explains everything else that failed with it; any other error of ours
    is raised as it is, and anything else (a defect) as a `WorkerError` naming it.
    """
    found = list(leaves(group))
    lost = [e for e in found if isinstance(e, ConnectionFailed)]
    ours = [e for e in found if isinstance(e, GDCWorkerError)]
    not_errors = [e for e in found if not isinstance(e, Exception)]  # KeyboardInterrupt & co.
    for candidates in (lost, ours, not_errors):
        if candidates:
            return candidates[0]
    error = WorkerError(f"the worker failed: {describe(found[0])}")
    error.__cause__ = found[0]
    return error


def leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    """The exceptions inside `group` and its nested groups."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from leaves(exc)
        else:
            yield exc
