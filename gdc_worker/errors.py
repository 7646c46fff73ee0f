"""The exception tree: every error gdc-worker raises on purpose derives from `GDCWorkerError`."""

from __future__ import annotations


class GDCWorkerError(Exception):
    """Root of all errors raised by gdc-worker."""


class ConfigError(GDCWorkerError, ValueError):
    """Raised by `NATSConfig` for a setting that is invalid; the message names it."""


class EventError(GDCWorkerError, ValueError):
    """An event or its payload does not have the expected shape."""


class EventDecodeError(EventError):
    """Raised by `Event.from_json` when the bytes are not a valid GDC event."""


class EventDataError(EventError):
    """Raised by `parse_event_data` when the event's data does not fit the payload type."""


class EventBusError(GDCWorkerError):
    """Base of the errors raised by `NATSEventBus`."""


class ConnectionFailed(EventBusError):
    """The NATS server could not be reached or JetStream is not available there."""


class PublishError(EventBusError):
    """One or more events were not stored by JetStream."""


class SubscriptionError(EventBusError):
    """A subscription could not be created, or was asked for with an invalid pattern."""


class NATSServerError(GDCWorkerError):
    """The embedded `nats-server` could not be found, started or stopped."""
