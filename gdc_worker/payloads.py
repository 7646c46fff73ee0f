"""Which payload struct each event type's data decodes into: the registry typed handlers obey.

The 17 GDC types come registered (`pin.requested` -> `PinRequestedEvent`, ...); a service adds
its own types with `register_payload_type`, before declaring the handlers that take them.
"""

from __future__ import annotations

import weakref
from typing import Protocol

import msgspec

from .errors import HandlerDefinitionError
from .events import (
    AlertResolvedEvent,
    AlertTriggeredEvent,
    Event,
    EventType,
    ExecCompletedEvent,
    ExecFailedEvent,
    ExecProgressEvent,
    HealthChangedEvent,
    NodeDownEvent,
    NodeUpEvent,
    PinCompletedEvent,
    PinFailedEvent,
    PinRequestedEvent,
    PlanFailedEvent,
    PlanReadyEvent,
    PolicyDeletedEvent,
    PolicyUpdatedEvent,
    ZoneDownEvent,
    ZoneUpEvent,
)
from .subjects import is_event_type, subjects_overlap

__all__ = [
    "TypedHandler",
    "check_payload_type",
    "claim_payload_type",
    "payload_types",
    "register_payload_type",
]

_registry: dict[str, type[msgspec.Struct]] = {
    EventType.PIN_REQUESTED: PinRequestedEvent,
    EventType.PIN_COMPLETED: PinCompletedEvent,
    EventType.PIN_FAILED: PinFailedEvent,
    EventType.PLAN_READY: PlanReadyEvent,
    EventType.PLAN_FAILED: PlanFailedEvent,
    EventType.EXEC_PROGRESS: ExecProgressEvent,
    EventType.EXEC_COMPLETED: ExecCompletedEvent,
    EventType.EXEC_FAILED: ExecFailedEvent,
    EventType.HEALTH_CHANGED: HealthChangedEvent,
    EventType.NODE_DOWN: NodeDownEvent,
    EventType.NODE_UP: NodeUpEvent,
    EventType.ZONE_DOWN: ZoneDownEvent,
    EventType.ZONE_UP: ZoneUpEvent,
    EventType.POLICY_UPDATED: PolicyUpdatedEvent,
    EventType.POLICY_DELETED: PolicyDeletedEvent,
    EventType.ALERT_TRIGGERED: AlertTriggeredEvent,
    EventType.ALERT_RESOLVED: AlertResolvedEvent,
}


def register_payload_type(event_type: str, struct_type: type[msgspec.Struct]) -> None:
    """Declare that events of `event_type` carry data of `struct_type` (a `msgspec.Struct`).

    A handler of that type (or of a pattern matching it) may then be annotated with
    `struct_type` only. Registering the same pair again does nothing; anything else that
    cannot hold raises `HandlerDefinitionError` naming it.
    """
    if not isinstance(event_type, str) or not is_event_type(event_type):
        raise HandlerDefinitionError(
            f"cannot register a payload type for {event_type!r}: an event type is dot-separated "
            "names of letters, digits, '-' or '_' (e.g. 'billing.invoiced'), without wildcards"
        )
    if not (isinstance(struct_type, type) and issubclass(struct_type, msgspec.Struct)):
        raise HandlerDefinitionError(
            f"cannot register {struct_type!r} for {event_type}: a payload type is a "
            "msgspec.Struct subclass"
        )
    if issubclass(struct_type, Event):
        raise HandlerDefinitionError(
            f"cannot register {struct_type.__name__} for {event_type}: an Event is the envelope, "
            "not the data it carries"
        )
    registered = _registry.get(event_type, struct_type)
    if registered is not struct_type:
        raise HandlerDefinitionError(
            f"cannot register {struct_type.__name__} for {event_type}: its events already carry "
            f"{registered.__name__}"
        )
    for handler in _typed_handlers():
        taken = handler.payload_type
        if taken not in (None, struct_type) and subjects_overlap(handler.pattern, event_type):
            raise HandlerDefinitionError(
                f"cannot register {struct_type.__name__} for {event_type}: handler "
                f"{handler.name!r} of {handler.pattern!r} takes {taken.__name__}; register "
                "payload types before declaring the handlers that take them"
            )
    _registry[str(event_type)] = struct_type


class TypedHandler(Protocol):
    """A declared handler, as the registry sees it (a `HandlerSpec`)."""

    @property
    def name(self) -> str: ...
    @property
    def pattern(self) -> str: ...
    @property
    def payload_type(self) -> type[msgspec.Struct] | None: ...


#: The typed handlers declared so far, while they live: a registration must fit them too.
_handlers: list[weakref.ref[TypedHandler]] = []


def claim_payload_type(handler: TypedHandler) -> None:
    """Keep `handler` (its payload type checked) so that registering a type it would be given
    data of another struct is refused; the handler is held weakly, only while it lives."""
    _handlers[:] = [ref for ref in _handlers if ref() is not None]
    _handlers.append(weakref.ref(handler))


def _typed_handlers() -> list[TypedHandler]:
    return [handler for ref in _handlers if (handler := ref()) is not None]


def payload_types() -> dict[str, type[msgspec.Struct]]:
    """The registry: each event type with the struct its data decodes into (a copy)."""
    return dict(_registry)


def check_payload_type(pattern: str, struct_type: type[msgspec.Struct], handler: str) -> None:
    """Refuse a handler of `pattern` taking `struct_type` if a type it matches carries another.

    Raises `HandlerDefinitionError` naming the handler, the types and the structs they carry.
    """
    others = {
        t: s for t, s in _registry.items() if s is not struct_type and subjects_overlap(pattern, t)
    }
    if others:
        carried = ", ".join(f"{t} carries {s.__name__}" for t, s in sorted(others.items()))
        raise HandlerDefinitionError(
            f"handler {handler!r} takes {struct_type.__name__}, which does not fit the events of "
            f"{pattern!r}: {carried}. Annotate it with the struct its events carry, or take the "
            "envelope (`event: Event`) and call parse_event_data for each type"
        )
