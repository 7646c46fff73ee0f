"""Events: the 17 constructors, the JSON envelope, trace ids and the typed payloads."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from gdc_worker import events
from gdc_worker.errors import EventDataError, EventDecodeError, GDCWorkerError
from gdc_worker.events import (
    AlertTriggeredEvent,
    Assignment,
    Event,
    EventType,
    ExecProgressEvent,
    HealthChangedEvent,
    PinRequestedEvent,
    PlanReadyEvent,
    PolicyUpdatedEvent,
    new_alert_resolved_event,
    new_alert_triggered_event,
    new_exec_completed_event,
    new_exec_failed_event,
    new_exec_progress_event,
    new_health_changed_event,
    new_node_down_event,
    new_node_up_event,
    new_pin_completed_event,
    new_pin_failed_event,
    new_pin_requested_event,
    new_plan_failed_event,
    new_plan_ready_event,
    new_policy_deleted_event,
    new_policy_updated_event,
    new_zone_down_event,
    new_zone_up_event,
    parse_event_data,
)

SOURCE = "test-service"
TRACE_ID = "trace-4bf92f3577b34da6"
COMPLETED_AT = datetime(2026, 11, 26, 9, 30, 17, 123457, tzinfo=UTC)

PIN = PinRequestedEvent(
    cid="QmTest123",
    size=1024,
    policies=["rf-3", "zone-msk-nn"],
    constraints={"priority": "high"},
    priority=1,
    requested_by="user123",
)
PLAN = PlanReadyEvent(
    plan_id="plan-123",
    cid="QmTest123",
    assignments=[
        Assignment(node_id="node1", cluster_id="cluster1", zone_id="msk"),
        Assignment(node_id="node2", cluster_id="cluster2", zone_id="nn"),
    ],
    estimated_cost=10.5,
)
PROGRESS = ExecProgressEvent(
    workflow_id="workflow-123",
    step_id="pin-step-1",
    status="running",
    progress=0.75,
    message="Pinning to cluster1",
    completed_at=COMPLETED_AT,
)
HEALTH = HealthChangedEvent(
    resource_type="node",
    resource_id="node-123",
    old_status="healthy",
    new_status="degraded",
    reason="high CPU usage",
)
POLICY = PolicyUpdatedEvent(
    policy_id="policy-123",
    policy_name="replication-policy",
    version=2,
    updated_by="admin",
    changes=["updated RF from 2 to 3", "added zone constraint"],
)
ALERT = AlertTriggeredEvent(
    alert_id="alert-123",
    alert_name="high-cpu-usage",
    severity="critical",
    description="CPU usage above 90%",
    labels={"node_id": "node-123", "zone": "msk"},
    value=95.5,
    threshold=90.0,
)

ASSIGNMENT_1 = {"node_id": "node1", "cluster_id": "cluster1", "zone_id": "msk"}
ASSIGNMENT_2 = {"node_id": "node2", "cluster_id": "cluster2", "zone_id": "nn"}


@dataclass(frozen=True)
class Case:
    """One `new_*_event` helper, the arguments it is called with and what Go would build."""

    type: EventType
    helper: Callable[..., Event]
    args: tuple[Any, ...]
    subject: str
    # The data, less the `*_at` timestamp that the hand-built payloads stamp themselves.
    data: dict[str, Any]
    at_key: str | None = None
    payload: msgspec.Struct | None = field(default=None)

    def build(self, trace_id: str | None = TRACE_ID) -> Event:
        """Call the helper; `None` leaves the trace id argument out."""
        if trace_id is None:
            return self.helper(SOURCE, *self.args)
        return self.helper(SOURCE, *self.args, trace_id=trace_id)


CASES: tuple[Case, ...] = (
    Case(
        EventType.PIN_REQUESTED,
        new_pin_requested_event,
        (PIN,),
        "QmTest123",
        {
            "cid": "QmTest123",
            "size": 1024,
            "policies": ["rf-3", "zone-msk-nn"],
            "constraints": {"priority": "high"},
            "priority": 1,
            "requested_by": "user123",
        },
        payload=PIN,
    ),
    Case(
        EventType.PIN_COMPLETED,
        new_pin_completed_event,
        # An `Assignment` and a plain mapping are both accepted.
        ("QmTest123", [Assignment(**ASSIGNMENT_1), ASSIGNMENT_2]),
        "QmTest123",
        {"cid": "QmTest123", "assignments": [ASSIGNMENT_1, ASSIGNMENT_2]},
        at_key="completed_at",
    ),
    Case(
        EventType.PIN_FAILED,
        new_pin_failed_event,
        ("QmTest123", "insufficient nodes"),
        "QmTest123",
        {"cid": "QmTest123", "reason": "insufficient nodes"},
        at_key="failed_at",
    ),
    Case(
        EventType.PLAN_READY,
        new_plan_ready_event,
        (PLAN,),
        "QmTest123",
        {
            "plan_id": "plan-123",
            "cid": "QmTest123",
            "assignments": [ASSIGNMENT_1, ASSIGNMENT_2],
            "estimated_cost": 10.5,
        },
        payload=PLAN,
    ),
    Case(
        EventType.PLAN_FAILED,
        new_plan_failed_event,
        ("QmTest123", "no zone satisfies rf-3"),
        "QmTest123",
        {"cid": "QmTest123", "reason": "no zone satisfies rf-3"},
        at_key="failed_at",
    ),
    Case(
        EventType.EXEC_PROGRESS,
        new_exec_progress_event,
        (PROGRESS,),
        "workflow.workflow-123",
        {
            "workflow_id": "workflow-123",
            "step_id": "pin-step-1",
            "status": "running",
            "progress": 0.75,
            "message": "Pinning to cluster1",
            "completed_at": "2026-11-26T09:30:17.123457Z",
        },
        payload=PROGRESS,
    ),
    Case(
        EventType.EXEC_COMPLETED,
        new_exec_completed_event,
        ("workflow-123", {"pinned": 2, "bytes": 2048}),
        "workflow.workflow-123",
        {"workflow_id": "workflow-123", "result": {"pinned": 2, "bytes": 2048}},
        at_key="completed_at",
    ),
    Case(
        EventType.EXEC_FAILED,
        new_exec_failed_event,
        ("workflow-123", "cluster2 unreachable"),
        "workflow.workflow-123",
        {"workflow_id": "workflow-123", "reason": "cluster2 unreachable"},
        at_key="failed_at",
    ),
    Case(
        EventType.HEALTH_CHANGED,
        new_health_changed_event,
        (HEALTH,),
        "node.node-123",
        {
            "resource_type": "node",
            "resource_id": "node-123",
            "old_status": "healthy",
            "new_status": "degraded",
            "reason": "high CPU usage",
        },
        payload=HEALTH,
    ),
    Case(
        EventType.NODE_DOWN,
        new_node_down_event,
        ("node-123", "connection timeout"),
        "node-123",
        {"node_id": "node-123", "reason": "connection timeout"},
        at_key="down_at",
    ),
    Case(
        EventType.NODE_UP,
        new_node_up_event,
        ("node-123",),
        "node-123",
        {"node_id": "node-123"},
        at_key="up_at",
    ),
    Case(
        EventType.ZONE_DOWN,
        new_zone_down_event,
        ("msk", "power loss"),
        "msk",
        {"zone_id": "msk", "reason": "power loss"},
        at_key="down_at",
    ),
    Case(
        EventType.ZONE_UP,
        new_zone_up_event,
        ("msk",),
        "msk",
        {"zone_id": "msk"},
        at_key="up_at",
    ),
    Case(
        EventType.POLICY_UPDATED,
        new_policy_updated_event,
        (POLICY,),
        "policy-123",
        {
            "policy_id": "policy-123",
            "policy_name": "replication-policy",
            "version": 2,
            "updated_by": "admin",
            "changes": ["updated RF from 2 to 3", "added zone constraint"],
        },
        payload=POLICY,
    ),
    Case(
        EventType.POLICY_DELETED,
        new_policy_deleted_event,
        ("policy-123", "admin"),
        "policy-123",
        {"policy_id": "policy-123", "deleted_by": "admin"},
        at_key="deleted_at",
    ),
    Case(
        EventType.ALERT_TRIGGERED,
        new_alert_triggered_event,
        (ALERT,),
        "alert-123",
        {
            "alert_id": "alert-123",
            "alert_name": "high-cpu-usage",
            "severity": "critical",
            "description": "CPU usage above 90%",
            "labels": {"node_id": "node-123", "zone": "msk"},
            "value": 95.5,
            "threshold": 90.0,
        },
        payload=ALERT,
    ),
    Case(
        EventType.ALERT_RESOLVED,
        new_alert_resolved_event,
        ("alert-123", "auto-resolved"),
        "alert-123",
        {"alert_id": "alert-123", "resolved_by": "auto-resolved"},
        at_key="resolved_at",
    ),
)

by_type = pytest.mark.parametrize("case", CASES, ids=lambda c: str(c.type))
TIMESTAMPED = [c for c in CASES if c.at_key is not None]
TYPED = [c for c in CASES if c.payload is not None]


def _utc(text: str) -> datetime:
    """Parse an RFC 3339 UTC timestamp as Go writes it (`...Z`)."""
    assert text.endswith("Z"), f"{text!r} is not a UTC RFC 3339 timestamp"
    parsed = datetime.fromisoformat(text)
    assert parsed.utcoffset() == timedelta(0)
    return parsed


def _valid_event(*, drop: str = "", **changes: Any) -> dict[str, Any]:
    """A well-formed event as a JSON object, with some keys changed and one key dropped."""
    obj: dict[str, Any] = {
        "id": "6f1c2a4e-0000-4000-8000-000000000001",
        "type": "pin.requested",
        "source": "api-gateway",
        "subject": "QmTest123",
        "data": {"cid": "QmTest123"},
        "timestamp": "2026-11-26T09:30:15.123456Z",
        "version": "1.0",
    }
    obj.update(changes)
    obj.pop(drop, None)
    return obj


def _event_with_data(data: dict[str, Any], type: str = "pin.requested") -> Event:
    return Event.from_json(json.dumps(_valid_event(type=type, data=data)))


# --- the constructors ------------------------------------------------------------------------


def test_every_helper_and_every_type_is_covered() -> None:
    """Given the public `new_*_event` helpers, the table below exercises each one once per type."""
    helpers = {name for name in events.__all__ if name.startswith("new_")}
    assert {c.helper.__name__ for c in CASES} == helpers
    assert [c.type for c in CASES] == list(EventType)


@by_type
def test_helper_sets_type_source_subject_and_data_as_go_does(case: Case) -> None:
    """When a service builds an event with a helper, type, source, subject and data match Go's."""
    event = case.build()

    assert event.type == case.type
    assert event.source == SOURCE
    assert event.subject == case.subject
    data = dict(event.data or {})
    if case.at_key is not None:
        data.pop(case.at_key)
    assert data == case.data


@pytest.mark.parametrize("case", TIMESTAMPED, ids=lambda c: str(c.type))
def test_hand_built_payload_is_stamped_with_the_current_utc_time(case: Case) -> None:
    """Given a helper without a typed payload, its `*_at` key holds now as RFC 3339 UTC."""
    before = datetime.now(UTC)
    event = case.build()
    after = datetime.now(UTC)

    assert case.at_key is not None
    stamped = (event.data or {})[case.at_key]
    assert isinstance(stamped, str)
    assert before <= _utc(stamped) <= after


@by_type
def test_envelope_has_uuid4_id_version_1_0_and_utc_timestamp_of_now(case: Case) -> None:
    """When an event is built, it gets a fresh uuid4 id, version 1.0 and an aware UTC time."""
    before = datetime.now(UTC)
    event = case.build()
    after = datetime.now(UTC)

    assert str(uuid.UUID(event.id)) == event.id
    assert uuid.UUID(event.id).version == 4
    assert event.version == "1.0"
    assert event.timestamp.utcoffset() == timedelta(0)
    assert before <= event.timestamp <= after


def test_each_event_gets_its_own_id() -> None:
    """Given two events built from the same arguments, their ids differ."""
    first, second = CASES[0].build(), CASES[0].build()
    assert first.id != second.id


# --- trace ids -------------------------------------------------------------------------------


@by_type
def test_helper_passes_the_trace_id_through_to_the_wire(case: Case) -> None:
    """When a helper is given a trace id, the event and its JSON carry it."""
    event = case.build(TRACE_ID)

    assert event.trace_id == TRACE_ID
    assert json.loads(event.to_json())["trace_id"] == TRACE_ID


@by_type
@pytest.mark.parametrize("trace_id", [None, ""], ids=["omitted", "empty"])
def test_event_without_trace_id_leaves_it_out_of_the_json(case: Case, trace_id: str | None) -> None:
    """Given no trace id, the event's is empty and the JSON has no `trace_id`, like Go's."""
    event = case.build(trace_id)

    assert event.trace_id == ""
    assert "trace_id" not in json.loads(event.to_json())


def test_with_trace_id_sets_it_and_returns_the_same_event() -> None:
    """When `with_trace_id` is called, it sets the id on the event itself and returns it."""
    event = CASES[0].build("")

    returned = event.with_trace_id("trace-xyz")

    assert returned is event
    assert event.trace_id == "trace-xyz"
    assert json.loads(event.to_json())["trace_id"] == "trace-xyz"


# --- JSON round trip and decoding errors ----------------------------------------------------


@by_type
@pytest.mark.parametrize("trace_id", [TRACE_ID, ""], ids=["traced", "untraced"])
def test_to_json_from_json_round_trip(case: Case, trace_id: str) -> None:
    """Given any event, decoding its JSON gives back an equal event."""
    event = case.build(trace_id)

    assert Event.from_json(event.to_json()) == event


@pytest.mark.parametrize(
    "convert",
    [bytes, bytearray, memoryview, lambda raw: raw.decode()],
    ids=["bytes", "bytearray", "memoryview", "str"],
)
def test_from_json_accepts_bytes_like_and_str(convert: Callable[[bytes], Any]) -> None:
    """When a message body arrives as bytes, bytearray, memoryview or str, it decodes."""
    event = CASES[0].build()

    assert Event.from_json(convert(event.to_json())) == event


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        pytest.param(b"not json", "malformed", id="not-json"),
        pytest.param(b"\xff\xfe", "malformed", id="not-utf8"),
        pytest.param(b"", "truncated", id="empty"),
        pytest.param(b'{"id": "x"', "truncated", id="cut-short"),
        pytest.param(b"[]", "object", id="array"),
        pytest.param(b"null", "object", id="null"),
        pytest.param(json.dumps(_valid_event(drop="type")), "`type`", id="missing-type"),
        pytest.param(json.dumps(_valid_event(drop="timestamp")), "`timestamp`", id="missing-ts"),
        pytest.param(json.dumps(_valid_event(id=42)), "$.id", id="int-id"),
        pytest.param(json.dumps(_valid_event(data=[1, 2])), "$.data", id="array-data"),
        pytest.param(json.dumps(_valid_event(data="x")), "$.data", id="string-data"),
        pytest.param(json.dumps(_valid_event(timestamp="yesterday")), "$.timestamp", id="bad-ts"),
        pytest.param(json.dumps(_valid_event(trace_id=7)), "$.trace_id", id="int-trace-id"),
    ],
)
def test_from_json_rejects_bad_input_naming_the_problem(raw: bytes | str, named: str) -> None:
    """Given bytes that are not a GDC event, `from_json` raises `EventDecodeError` saying why."""
    with pytest.raises(EventDecodeError) as excinfo:
        Event.from_json(raw)

    assert named in str(excinfo.value)


@pytest.mark.parametrize("catch_as", [EventDecodeError, GDCWorkerError, ValueError])
def test_decode_error_is_catchable_as_the_library_root_and_value_error(
    catch_as: type[Exception],
) -> None:
    """When decoding fails, callers may catch `GDCWorkerError` or `ValueError` instead."""
    with pytest.raises(catch_as):
        Event.from_json(b"{")


def test_from_json_turns_null_data_into_an_empty_dict() -> None:
    """Given Go's encoding of a nil data map (`null`), the handler sees an empty dict."""
    event = Event.from_json(json.dumps(_valid_event(data=None)))

    assert event.data == {}


def test_from_json_keeps_an_event_type_it_does_not_know() -> None:
    """Given a type that a newer service added, the event still decodes with that type."""
    event = Event.from_json(json.dumps(_valid_event(type="pin.archived")))

    assert event.type == "pin.archived"


def test_from_json_rejects_a_timestamp_without_a_zone() -> None:
    """Given a timestamp with no UTC offset, which Go cannot decode, `from_json` refuses it."""
    with pytest.raises(EventDecodeError, match="timestamp"):
        Event.from_json(json.dumps(_valid_event(timestamp="2026-11-26T09:30:15")))


# --- typed payloads --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("helper", "payload", "go_keys"),
    [
        pytest.param(
            new_pin_requested_event,
            PinRequestedEvent(cid="Qm"),
            {"cid", "size", "policies", "constraints", "priority", "requested_by"},
            id="pin.requested",
        ),
        pytest.param(
            new_plan_ready_event,
            PlanReadyEvent(cid="Qm"),
            {"plan_id", "cid", "assignments", "estimated_cost"},
            id="plan.ready",
        ),
        pytest.param(
            new_exec_progress_event,
            ExecProgressEvent(workflow_id="w"),
            {"workflow_id", "step_id", "status", "progress"},
            id="exec.progress",
        ),
        pytest.param(
            new_health_changed_event,
            HealthChangedEvent(resource_type="node", resource_id="n"),
            {"resource_type", "resource_id", "old_status", "new_status"},
            id="health.changed",
        ),
        pytest.param(
            new_policy_updated_event,
            PolicyUpdatedEvent(policy_id="p"),
            {"policy_id", "policy_name", "version", "updated_by"},
            id="policy.updated",
        ),
        pytest.param(
            new_alert_triggered_event,
            AlertTriggeredEvent(alert_id="a"),
            {"alert_id", "alert_name", "severity", "description", "labels"},
            id="alert.triggered",
        ),
    ],
)
def test_typed_payload_leaves_out_zero_omitempty_fields_like_go(
    helper: Callable[..., Event], payload: msgspec.Struct, go_keys: set[str]
) -> None:
    """Given a payload with zero values, the data has exactly the keys Go's `json.Marshal` writes.

    Fields tagged `omitempty` in Go (message, completed_at, reason, changes, value, threshold)
    are left out; every other field is written even when zero.
    """
    event = helper(SOURCE, payload)

    assert set(event.data or {}) == go_keys


@pytest.mark.parametrize("case", TYPED, ids=lambda c: str(c.type))
def test_parse_event_data_gives_back_the_typed_payload(case: Case) -> None:
    """Given an event built from a typed payload, `parse_event_data` returns an equal payload."""
    assert case.payload is not None
    event = Event.from_json(case.build().to_json())

    assert parse_event_data(event, type(case.payload)) == case.payload


@pytest.mark.parametrize("case", TYPED, ids=lambda c: str(c.type))
def test_parse_event_data_ignores_unknown_keys(case: Case) -> None:
    """Given data with keys a newer producer added, the known fields still parse."""
    assert case.payload is not None
    event = case.build()
    event.data = {**(event.data or {}), "added_in_v2": {"nested": [1, 2]}, "zz": None}

    assert parse_event_data(event, type(case.payload)) == case.payload


def test_parse_event_data_decodes_nested_assignments_and_completed_at() -> None:
    """Given plan.ready and exec.progress data, nested and datetime fields come out typed."""
    plan = parse_event_data(
        _event_with_data(
            {"plan_id": "p", "cid": "c", "assignments": [ASSIGNMENT_1], "estimated_cost": 3},
            "plan.ready",
        ),
        PlanReadyEvent,
    )
    progress = parse_event_data(
        _event_with_data({"completed_at": "2026-11-26T09:30:17.123456789Z"}, "exec.progress"),
        ExecProgressEvent,
    )

    assert plan.assignments == [Assignment(node_id="node1", cluster_id="cluster1", zone_id="msk")]
    assert plan.estimated_cost == 3.0
    assert progress.completed_at == COMPLETED_AT


ZERO_VALUES: dict[type[msgspec.Struct], dict[str, Any]] = {
    PinRequestedEvent: {
        "cid": "",
        "size": 0,
        "policies": [],
        "constraints": {},
        "priority": 0,
        "requested_by": "",
    },
    PlanReadyEvent: {"plan_id": "", "cid": "", "assignments": [], "estimated_cost": 0.0},
    ExecProgressEvent: {
        "workflow_id": "",
        "step_id": "",
        "status": "",
        "progress": 0.0,
        "message": "",
        "completed_at": None,
    },
    HealthChangedEvent: {
        "resource_type": "",
        "resource_id": "",
        "old_status": "",
        "new_status": "",
        "reason": "",
    },
    PolicyUpdatedEvent: {
        "policy_id": "",
        "policy_name": "",
        "version": 0,
        "updated_by": "",
        "changes": [],
    },
    AlertTriggeredEvent: {
        "alert_id": "",
        "alert_name": "",
        "severity": "",
        "description": "",
        "labels": {},
        "value": 0.0,
        "threshold": 0.0,
    },
}


@pytest.mark.parametrize("payload_type", ZERO_VALUES, ids=lambda t: t.__name__)
def test_parse_event_data_gives_go_zero_values_for_missing_keys(
    payload_type: type[msgspec.Struct],
) -> None:
    """Given empty data, every field takes Go's zero value, as `json.Unmarshal` leaves it."""
    parsed = parse_event_data(_event_with_data({}), payload_type)

    assert msgspec.structs.asdict(parsed) == ZERO_VALUES[payload_type]


@pytest.mark.parametrize(
    ("payload_type", "data", "named"),
    [
        (PinRequestedEvent, {"size": "1 KiB"}, "size"),
        (PinRequestedEvent, {"policies": "rf-3"}, "policies"),
        (PinRequestedEvent, {"constraints": {"priority": 1}}, "constraints"),
        (PlanReadyEvent, {"assignments": [{"node_id": 3}]}, "assignments[0].node_id"),
        (PlanReadyEvent, {"estimated_cost": "cheap"}, "estimated_cost"),
        (ExecProgressEvent, {"progress": "half"}, "progress"),
        (ExecProgressEvent, {"completed_at": "yesterday"}, "completed_at"),
        (HealthChangedEvent, {"new_status": 1}, "new_status"),
        (PolicyUpdatedEvent, {"version": "2"}, "version"),
        (AlertTriggeredEvent, {"labels": ["zone"]}, "labels"),
        (AlertTriggeredEvent, {"threshold": "90"}, "threshold"),
    ],
    ids=lambda p: p if isinstance(p, str) else None,
)
def test_parse_event_data_rejects_a_mistyped_value_naming_the_field(
    payload_type: type[msgspec.Struct], data: dict[str, Any], named: str
) -> None:
    """Given data with a value of the wrong type, `EventDataError` names the field."""
    event = _event_with_data(data)

    with pytest.raises(EventDataError) as excinfo:
        parse_event_data(event, payload_type)

    message = str(excinfo.value)
    assert named in message
    assert payload_type.__name__ in message
    assert isinstance(excinfo.value, GDCWorkerError)
    assert isinstance(excinfo.value, ValueError)


@pytest.mark.parametrize(
    ("payload_type", "field"),
    [
        (ExecProgressEvent, "completed_at"),
        (events.PinCompletedEvent, "completed_at"),
        (events.PinFailedEvent, "failed_at"),
        (events.PlanFailedEvent, "failed_at"),
        (events.ExecCompletedEvent, "completed_at"),
        (events.ExecFailedEvent, "failed_at"),
        (events.NodeDownEvent, "down_at"),
        (events.NodeUpEvent, "up_at"),
        (events.ZoneDownEvent, "down_at"),
        (events.ZoneUpEvent, "up_at"),
        (events.PolicyDeletedEvent, "deleted_at"),
        (events.AlertResolvedEvent, "resolved_at"),
    ],
    ids=lambda p: p if isinstance(p, str) else p.__name__,
)
def test_a_payload_refuses_a_time_go_cannot_read(
    payload_type: type[msgspec.Struct], field: str
) -> None:
    """Given a naive time (no timezone), which Go could not decode, the payload refuses it,
    naming the field; an aware one is kept."""
    with pytest.raises(ValueError, match=field):
        payload_type(**{field: datetime(2026, 11, 26, 9, 30, 17)})

    assert getattr(payload_type(**{field: COMPLETED_AT}), field) == COMPLETED_AT


# --- EventType -------------------------------------------------------------------------------

GO_EVENT_TYPES = {
    "PIN_REQUESTED": "pin.requested",
    "PIN_COMPLETED": "pin.completed",
    "PIN_FAILED": "pin.failed",
    "PLAN_READY": "plan.ready",
    "PLAN_FAILED": "plan.failed",
    "EXEC_PROGRESS": "exec.progress",
    "EXEC_COMPLETED": "exec.completed",
    "EXEC_FAILED": "exec.failed",
    "HEALTH_CHANGED": "health.changed",
    "NODE_DOWN": "node.down",
    "NODE_UP": "node.up",
    "ZONE_DOWN": "zone.down",
    "ZONE_UP": "zone.up",
    "POLICY_UPDATED": "policy.updated",
    "POLICY_DELETED": "policy.deleted",
    "ALERT_TRIGGERED": "alert.triggered",
    "ALERT_RESOLVED": "alert.resolved",
}


def test_event_type_has_exactly_the_17_go_types() -> None:
    """Given the Go bus's 17 event types, `EventType` has exactly those names and strings."""
    assert {member.name: member.value for member in EventType} == GO_EVENT_TYPES


@pytest.mark.parametrize("wire", GO_EVENT_TYPES.values())
def test_event_type_compares_equal_to_its_wire_string(wire: str) -> None:
    """When a decoded `event.type` (a str) is compared with a member, they are equal."""
    member = EventType(wire)

    assert member == wire
    assert str(member) == wire
    assert {wire: "handler"}[member] == "handler"
    assert Event.from_json(json.dumps(_valid_event(type=wire))).type == member


def test_nested_nulls_parse_as_zero_values_as_in_go() -> None:
    """Given a plan.ready whose assignment has a null node id (Go's zero value is ""),
    when parsed, the assignment comes back with an empty node id instead of an error."""
    event = Event.from_json(
        b'{"id":"x","type":"plan.ready","source":"s","subject":"c","data":{"cid":"c",'
        b'"assignments":[{"node_id":null,"cluster_id":"k","zone_id":"z"}]},'
        b'"timestamp":"2026-11-26T09:30:15Z","version":"1.0"}'
    )

    plan = parse_event_data(event, PlanReadyEvent)

    assert plan.assignments == [Assignment(node_id="", cluster_id="k", zone_id="z")]
