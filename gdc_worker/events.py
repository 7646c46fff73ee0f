"""GDC events: the envelope, the typed payloads and one constructor per event type.

The JSON encoding matches the Go event bus (`encoding/json`): the same field names, `trace_id`
left out when empty, data keys in sorted order and RFC 3339 UTC timestamps. Go's nanosecond
timestamps decode to the nearest microsecond, the precision of `datetime`.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

import msgspec

from .errors import EventDataError, EventDecodeError

__all__ = [
    "EVENT_VERSION",
    "MSG_ID_HEADER",
    "TRACE_HEADER",
    "AlertResolvedEvent",
    "AlertTriggeredEvent",
    "Assignment",
    "Event",
    "EventType",
    "ExecCompletedEvent",
    "ExecFailedEvent",
    "ExecProgressEvent",
    "HealthChangedEvent",
    "NodeDownEvent",
    "NodeUpEvent",
    "Payload",
    "PinCompletedEvent",
    "PinFailedEvent",
    "PinRequestedEvent",
    "PlanFailedEvent",
    "PlanReadyEvent",
    "PolicyDeletedEvent",
    "PolicyUpdatedEvent",
    "ZoneDownEvent",
    "ZoneUpEvent",
    "event_headers",
    "new_alert_resolved_event",
    "new_alert_triggered_event",
    "new_exec_completed_event",
    "new_exec_failed_event",
    "new_exec_progress_event",
    "new_health_changed_event",
    "new_node_down_event",
    "new_node_up_event",
    "new_pin_completed_event",
    "new_pin_failed_event",
    "new_pin_requested_event",
    "new_plan_failed_event",
    "new_plan_ready_event",
    "new_policy_deleted_event",
    "new_policy_updated_event",
    "new_zone_down_event",
    "new_zone_up_event",
    "parse_event_data",
]

EVENT_VERSION = "1.0"


class EventType(enum.StrEnum):
    """The 17 GDC event types; each member is its wire string."""

    PIN_REQUESTED = "pin.requested"
    PIN_COMPLETED = "pin.completed"
    PIN_FAILED = "pin.failed"
    PLAN_READY = "plan.ready"
    PLAN_FAILED = "plan.failed"
    EXEC_PROGRESS = "exec.progress"
    EXEC_COMPLETED = "exec.completed"
    EXEC_FAILED = "exec.failed"
    HEALTH_CHANGED = "health.changed"
    NODE_DOWN = "node.down"
    NODE_UP = "node.up"
    ZONE_DOWN = "zone.down"
    ZONE_UP = "zone.up"
    POLICY_UPDATED = "policy.updated"
    POLICY_DELETED = "policy.deleted"
    ALERT_TRIGGERED = "alert.triggered"
    ALERT_RESOLVED = "alert.resolved"


class Event(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One GDC event, as every service publishes it.

    `type` is a plain string so that a type added by a newer Go service still decodes; compare
    it with `EventType` members, which are strings too.
    """

    id: str
    type: str
    source: str
    subject: str
    data: dict[str, Any] | None
    trace_id: str = ""
    timestamp: datetime
    version: str

    def __post_init__(self) -> None:
        # Go encodes a nil map as null; handlers always get a dict.
        if self.data is None:
            self.data = {}
        _require_aware("timestamp", self.timestamp)

    @classmethod
    def new(cls, type: str, source: str, subject: str, data: Mapping[str, Any]) -> Event:
        """Build an event with a fresh uuid4 id, the current UTC time and version 1.0."""
        return cls(
            id=str(uuid.uuid4()),
            type=str(type),
            source=source,
            subject=subject,
            data=dict(data),
            timestamp=datetime.now(UTC),
            version=EVENT_VERSION,
        )

    def with_trace_id(self, trace_id: str) -> Event:
        """Set the trace id and return this same event, for chaining."""
        self.trace_id = trace_id
        return self

    def to_json(self) -> bytes:
        """The wire encoding: JSON that the Go bus decodes into its `Event`."""
        return _encoder.encode(self)

    @classmethod
    def from_json(cls, raw: bytes | bytearray | memoryview | str) -> Event:
        """Decode and validate one event; raises `EventDecodeError` naming what is wrong."""
        try:
            return _decoder.decode(raw)
        except msgspec.DecodeError as exc:
            raise EventDecodeError(f"not a valid GDC event: {exc}") from None


_encoder = msgspec.json.Encoder(order="deterministic")
_decoder = msgspec.json.Decoder(Event)


class Payload(msgspec.Struct, kw_only=True):
    """Base of the typed payloads; missing keys take Go's zero values, unknown keys are ignored."""

    # Fields tagged `omitempty` in Go: left out of the data when they hold a zero value.
    _omitempty: ClassVar[frozenset[str]] = frozenset()

    def to_data(self) -> dict[str, Any]:
        """The payload as the event's `data` mapping, as Go's `json.Marshal` would write it."""
        data: dict[str, Any] = msgspec.to_builtins(self)
        for name in self._omitempty:
            if not data.get(name):
                data.pop(name, None)
        return data


class _Timed(Payload):
    """A payload with timestamps (`_timestamps`); Go cannot decode one without a timezone."""

    _timestamps: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for name in self._timestamps:
            value = getattr(self, name)
            if value is not None:
                _require_aware(name, value)


class PinRequestedEvent(Payload):
    """Data of `pin.requested`: a request to pin content `cid`."""

    cid: str = ""
    size: int = 0
    policies: list[str] = msgspec.field(default_factory=list)
    constraints: dict[str, str] = msgspec.field(default_factory=dict)
    priority: int = 0
    requested_by: str = ""


class Assignment(Payload):
    """Where one replica of a pin goes."""

    node_id: str = ""
    cluster_id: str = ""
    zone_id: str = ""


class PlanReadyEvent(Payload):
    """Data of `plan.ready`: the scheduler's placement for a pin."""

    plan_id: str = ""
    cid: str = ""
    assignments: list[Assignment] = msgspec.field(default_factory=list)
    estimated_cost: float = 0.0


class ExecProgressEvent(_Timed):
    """Data of `exec.progress`: one step of an orchestrator workflow."""

    _omitempty = frozenset({"message", "completed_at"})
    _timestamps = ("completed_at",)

    workflow_id: str = ""
    step_id: str = ""
    status: str = ""
    progress: float = 0.0
    message: str = ""
    completed_at: datetime | None = None


class HealthChangedEvent(Payload):
    """Data of `health.changed`: a resource moved from one health status to another."""

    _omitempty = frozenset({"reason"})

    resource_type: str = ""
    resource_id: str = ""
    old_status: str = ""
    new_status: str = ""
    reason: str = ""


class PolicyUpdatedEvent(Payload):
    """Data of `policy.updated`."""

    _omitempty = frozenset({"changes"})

    policy_id: str = ""
    policy_name: str = ""
    version: int = 0
    updated_by: str = ""
    changes: list[str] = msgspec.field(default_factory=list)


class AlertTriggeredEvent(Payload):
    """Data of `alert.triggered`."""

    _omitempty = frozenset({"value", "threshold"})

    alert_id: str = ""
    alert_name: str = ""
    severity: str = ""
    description: str = ""
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    value: float = 0.0
    threshold: float = 0.0


# The types whose data the Go bus (and the helpers below) write as a plain map, with every key.


class PinCompletedEvent(_Timed):
    """Data of `pin.completed`: content `cid` is pinned on `assignments`."""

    _timestamps = ("completed_at",)

    cid: str = ""
    assignments: list[Assignment] = msgspec.field(default_factory=list)
    completed_at: datetime | None = None


class PinFailedEvent(_Timed):
    """Data of `pin.failed`: content `cid` could not be pinned."""

    _timestamps = ("failed_at",)

    cid: str = ""
    reason: str = ""
    failed_at: datetime | None = None


class PlanFailedEvent(_Timed):
    """Data of `plan.failed`: the scheduler found no placement for `cid`."""

    _timestamps = ("failed_at",)

    cid: str = ""
    reason: str = ""
    failed_at: datetime | None = None


class ExecCompletedEvent(_Timed):
    """Data of `exec.completed`: an orchestrator workflow finished with `result`."""

    _timestamps = ("completed_at",)

    workflow_id: str = ""
    result: dict[str, Any] = msgspec.field(default_factory=dict)
    completed_at: datetime | None = None


class ExecFailedEvent(_Timed):
    """Data of `exec.failed`: an orchestrator workflow gave up."""

    _timestamps = ("failed_at",)

    workflow_id: str = ""
    reason: str = ""
    failed_at: datetime | None = None


class NodeDownEvent(_Timed):
    """Data of `node.down`."""

    _timestamps = ("down_at",)

    node_id: str = ""
    reason: str = ""
    down_at: datetime | None = None


class NodeUpEvent(_Timed):
    """Data of `node.up`."""

    _timestamps = ("up_at",)

    node_id: str = ""
    up_at: datetime | None = None


class ZoneDownEvent(_Timed):
    """Data of `zone.down`."""

    _timestamps = ("down_at",)

    zone_id: str = ""
    reason: str = ""
    down_at: datetime | None = None


class ZoneUpEvent(_Timed):
    """Data of `zone.up`."""

    _timestamps = ("up_at",)

    zone_id: str = ""
    up_at: datetime | None = None


class PolicyDeletedEvent(_Timed):
    """Data of `policy.deleted`."""

    _timestamps = ("deleted_at",)

    policy_id: str = ""
    deleted_by: str = ""
    deleted_at: datetime | None = None


class AlertResolvedEvent(_Timed):
    """Data of `alert.resolved`."""

    _timestamps = ("resolved_at",)

    alert_id: str = ""
    resolved_by: str = ""
    resolved_at: datetime | None = None


def _require_aware(name: str, value: datetime) -> None:
    # Go cannot decode a timestamp without a zone, and naive times do not compare with aware ones.
    if value.tzinfo is None:
        raise ValueError(f"{name}: a timestamp needs a timezone (use UTC), got {value.isoformat()}")


P = TypeVar("P", bound=msgspec.Struct)


def _without_nulls(value: Any) -> Any:
    """`value` with null map entries dropped at every depth: Go reads null as the zero value."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def parse_event_data(event: Event, payload_type: type[P]) -> P:
    """Decode `event.data` into `payload_type`; raises `EventDataError` on a mistyped value.

    As in Go, unknown keys are ignored and missing or null values take their zero value (Go
    writes a nil list or map as null). A null the type accepts (an optional field, a value of
    a `dict[str, Any]`) stays None, as Go leaves a nil pointer or interface.
    """
    data = event.data or {}
    try:
        return msgspec.convert(data, payload_type)
    except msgspec.ValidationError:
        pass  # Nulls Go means as zero values? Looking for them walks the data: only now.
    try:
        return msgspec.convert(_without_nulls(data), payload_type)
    except msgspec.ValidationError as exc:
        raise EventDataError(
            f"data of {event.type} event {event.id} does not fit {payload_type.__name__}: {exc}"
        ) from None


def _now() -> str:
    """The current UTC time as the RFC 3339 string Go writes for a `time.Time`."""
    encoded: str = msgspec.to_builtins(datetime.now(UTC))
    return encoded


def _event(
    type: EventType, source: str, subject: str, data: Mapping[str, Any], trace_id: str
) -> Event:
    return Event.new(type, source, subject, data).with_trace_id(trace_id)


def new_pin_requested_event(source: str, data: PinRequestedEvent, trace_id: str = "") -> Event:
    """A `pin.requested` event; its subject is the cid."""
    return _event(EventType.PIN_REQUESTED, source, data.cid, data.to_data(), trace_id)


def new_pin_completed_event(
    source: str,
    cid: str,
    assignments: Sequence[Assignment | Mapping[str, str]],
    trace_id: str = "",
) -> Event:
    """A `pin.completed` event for `cid` placed on `assignments`."""
    placed = [a.to_data() if isinstance(a, Assignment) else dict(a) for a in assignments]
    data = {"cid": cid, "assignments": placed, "completed_at": _now()}
    return _event(EventType.PIN_COMPLETED, source, cid, data, trace_id)


def new_pin_failed_event(source: str, cid: str, reason: str, trace_id: str = "") -> Event:
    """A `pin.failed` event for `cid`."""
    data = {"cid": cid, "reason": reason, "failed_at": _now()}
    return _event(EventType.PIN_FAILED, source, cid, data, trace_id)


def new_plan_ready_event(source: str, data: PlanReadyEvent, trace_id: str = "") -> Event:
    """A `plan.ready` event; its subject is the cid."""
    return _event(EventType.PLAN_READY, source, data.cid, data.to_data(), trace_id)


def new_plan_failed_event(source: str, cid: str, reason: str, trace_id: str = "") -> Event:
    """A `plan.failed` event for `cid`."""
    data = {"cid": cid, "reason": reason, "failed_at": _now()}
    return _event(EventType.PLAN_FAILED, source, cid, data, trace_id)


def new_exec_progress_event(source: str, data: ExecProgressEvent, trace_id: str = "") -> Event:
    """An `exec.progress` event; its subject is `workflow.<workflow_id>`."""
    subject = f"workflow.{data.workflow_id}"
    return _event(EventType.EXEC_PROGRESS, source, subject, data.to_data(), trace_id)


def new_exec_completed_event(
    source: str, workflow_id: str, result: Mapping[str, Any], trace_id: str = ""
) -> Event:
    """An `exec.completed` event carrying the workflow's `result`."""
    data = {"workflow_id": workflow_id, "result": dict(result), "completed_at": _now()}
    return _event(EventType.EXEC_COMPLETED, source, f"workflow.{workflow_id}", data, trace_id)


def new_exec_failed_event(source: str, workflow_id: str, reason: str, trace_id: str = "") -> Event:
    """An `exec.failed` event for the workflow."""
    data = {"workflow_id": workflow_id, "reason": reason, "failed_at": _now()}
    return _event(EventType.EXEC_FAILED, source, f"workflow.{workflow_id}", data, trace_id)


def new_health_changed_event(source: str, data: HealthChangedEvent, trace_id: str = "") -> Event:
    """A `health.changed` event; its subject is `<resource_type>.<resource_id>`."""
    subject = f"{data.resource_type}.{data.resource_id}"
    return _event(EventType.HEALTH_CHANGED, source, subject, data.to_data(), trace_id)


def new_node_down_event(source: str, node_id: str, reason: str, trace_id: str = "") -> Event:
    """A `node.down` event; its subject is the node id."""
    data = {"node_id": node_id, "reason": reason, "down_at": _now()}
    return _event(EventType.NODE_DOWN, source, node_id, data, trace_id)


def new_node_up_event(source: str, node_id: str, trace_id: str = "") -> Event:
    """A `node.up` event; its subject is the node id."""
    data = {"node_id": node_id, "up_at": _now()}
    return _event(EventType.NODE_UP, source, node_id, data, trace_id)


def new_zone_down_event(source: str, zone_id: str, reason: str, trace_id: str = "") -> Event:
    """A `zone.down` event; its subject is the zone id."""
    data = {"zone_id": zone_id, "reason": reason, "down_at": _now()}
    return _event(EventType.ZONE_DOWN, source, zone_id, data, trace_id)


def new_zone_up_event(source: str, zone_id: str, trace_id: str = "") -> Event:
    """A `zone.up` event; its subject is the zone id."""
    data = {"zone_id": zone_id, "up_at": _now()}
    return _event(EventType.ZONE_UP, source, zone_id, data, trace_id)


def new_policy_updated_event(source: str, data: PolicyUpdatedEvent, trace_id: str = "") -> Event:
    """A `policy.updated` event; its subject is the policy id."""
    return _event(EventType.POLICY_UPDATED, source, data.policy_id, data.to_data(), trace_id)


def new_policy_deleted_event(
    source: str, policy_id: str, deleted_by: str, trace_id: str = ""
) -> Event:
    """A `policy.deleted` event; its subject is the policy id."""
    data = {"policy_id": policy_id, "deleted_by": deleted_by, "deleted_at": _now()}
    return _event(EventType.POLICY_DELETED, source, policy_id, data, trace_id)


def new_alert_triggered_event(source: str, data: AlertTriggeredEvent, trace_id: str = "") -> Event:
    """An `alert.triggered` event; its subject is the alert id."""
    return _event(EventType.ALERT_TRIGGERED, source, data.alert_id, data.to_data(), trace_id)


def new_alert_resolved_event(
    source: str, alert_id: str, resolved_by: str, trace_id: str = ""
) -> Event:
    """An `alert.resolved` event; its subject is the alert id."""
    data = {"alert_id": alert_id, "resolved_by": resolved_by, "resolved_at": _now()}
    return _event(EventType.ALERT_RESOLVED, source, alert_id, data, trace_id)


#: The header JetStream deduplicates on, within the stream's duplicate window.
MSG_ID_HEADER = "Nats-Msg-Id"
#: The header that carries an event's trace id, for tools that read headers only.
TRACE_HEADER = "Gdc-Trace-Id"


def event_headers(event: Event, msg_id: str | None = None) -> dict[str, str]:
    """Headers of a published event: the dedup id (the event id by default) and the trace id."""
    headers = {MSG_ID_HEADER: msg_id or event.id}
    if event.trace_id:
        headers[TRACE_HEADER] = event.trace_id
    return headers
