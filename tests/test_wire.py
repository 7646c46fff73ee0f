"""Wire compatibility with the Go event bus: golden fixtures and Go's own decoder (gowire)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest

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
    new_exec_progress_event,
    parse_event_data,
)
from gdc_worker.payloads import payload_types

from .test_events import CASES, TRACE_ID

# The shared folder sits next to the repository; GDC_SHARED_DIR points elsewhere if it does not.
SHARED_DIR = Path(
    os.environ.get("GDC_SHARED_DIR") or Path(__file__).resolve().parents[1].parent / "shared"
)
FIXTURES = SHARED_DIR / "fixtures" / "go-events.jsonl"
GOWIRE_SRC = SHARED_DIR / "tools" / "gowire"

# Field order of the Go bus's `Event` struct, which `encoding/json` follows.
GO_ENVELOPE_ORDER = ["id", "type", "source", "subject", "data", "trace_id", "timestamp", "version"]


def _fixture_lines() -> dict[str, bytes]:
    if not FIXTURES.is_file():
        pytest.skip(
            f"the Go bus's golden fixtures are not at {FIXTURES} (set GDC_SHARED_DIR)",
            allow_module_level=True,
        )
    lines = [line for line in FIXTURES.read_bytes().splitlines() if line.strip()]
    return {json.loads(line)["type"]: line for line in lines}


GO_LINES = _fixture_lines()
by_fixture = pytest.mark.parametrize("line", list(GO_LINES.values()), ids=list(GO_LINES))


def _nanos(rfc3339: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 UTC time, keeping all nine fraction digits."""
    whole, _, fraction = rfc3339.removesuffix("Z").partition(".")
    seconds = datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp()
    return int(seconds) * 10**9 + int(fraction.ljust(9, "0"))


def _datetime_nanos(value: datetime) -> int:
    return int(value.replace(microsecond=0).timestamp()) * 10**9 + value.microsecond * 1000


def _objects(value: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object inside `value`, itself included."""
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _objects(item)
    elif isinstance(value, list):
        for item in value:
            yield from _objects(item)


# --- golden fixtures -------------------------------------------------------------------------


def test_fixtures_hold_one_event_of_each_of_the_17_types() -> None:
    """Given the Go bus's golden file, it covers every `EventType` (else these tests miss one)."""
    assert sorted(GO_LINES) == sorted(EventType)


@by_fixture
def test_go_event_decodes_with_every_envelope_field(line: bytes) -> None:
    """When a Go service's event arrives, `from_json` keeps every envelope field."""
    expected = json.loads(line)

    event = Event.from_json(line)

    assert event.id == expected["id"]
    assert event.type == expected["type"]
    assert event.source == expected["source"]
    assert event.subject == expected["subject"]
    assert event.data == expected["data"]
    assert event.trace_id == expected.get("trace_id", "")
    assert event.version == expected["version"]


@by_fixture
def test_go_nanosecond_timestamp_decodes_to_the_nearest_microsecond(line: bytes) -> None:
    """Given Go's nanosecond timestamp, the decoded UTC datetime is within half a microsecond."""
    event = Event.from_json(line)

    assert event.timestamp.utcoffset() == timedelta(0)
    assert abs(_datetime_nanos(event.timestamp) - _nanos(json.loads(line)["timestamp"])) <= 500


def test_go_timestamp_rounds_to_the_nearest_microsecond() -> None:
    """Given `...15.124456789Z`, the datetime is 15.124457 UTC (nearest, not truncated)."""
    event = Event.from_json(GO_LINES["pin.requested"])

    assert event.timestamp == datetime(2026, 11, 26, 9, 30, 15, 124457, tzinfo=UTC)


GO_PAYLOADS: list[tuple[str, msgspec.Struct]] = [
    (
        "pin.requested",
        PinRequestedEvent(
            cid="QmTest123",
            size=1024,
            policies=["rf-3", "zone-msk-nn"],
            constraints={"priority": "high"},
            priority=1,
            requested_by="user123",
        ),
    ),
    (
        "plan.ready",
        PlanReadyEvent(
            plan_id="plan-123",
            cid="QmTest123",
            assignments=[
                Assignment(node_id="node1", cluster_id="cluster1", zone_id="msk"),
                Assignment(node_id="node2", cluster_id="cluster2", zone_id="nn"),
            ],
            estimated_cost=10.5,
        ),
    ),
    (
        "exec.progress",
        ExecProgressEvent(
            workflow_id="workflow-123",
            step_id="pin-step-1",
            status="running",
            progress=0.75,
            message="Pinning to cluster1",
            completed_at=datetime(2026, 11, 26, 9, 30, 17, 123457, tzinfo=UTC),
        ),
    ),
    (
        "health.changed",
        HealthChangedEvent(
            resource_type="node",
            resource_id="node-123",
            old_status="healthy",
            new_status="degraded",
            reason="high CPU usage",
        ),
    ),
    (
        "policy.updated",
        PolicyUpdatedEvent(
            policy_id="policy-123",
            policy_name="replication-policy",
            version=2,
            updated_by="admin",
            changes=["updated RF from 2 to 3", "added zone constraint"],
        ),
    ),
    (
        "alert.triggered",
        AlertTriggeredEvent(
            alert_id="alert-123",
            alert_name="high-cpu-usage",
            severity="critical",
            description="CPU usage above 90%",
            labels={"node_id": "node-123", "zone": "msk"},
            value=95.5,
            threshold=90.0,
        ),
    ),
]


@pytest.mark.parametrize(("event_type", "expected"), GO_PAYLOADS, ids=[t for t, _ in GO_PAYLOADS])
def test_go_payload_parses_into_its_typed_struct(event_type: str, expected: msgspec.Struct) -> None:
    """Given a Go event with a typed payload, `parse_event_data` yields the Go values."""
    event = Event.from_json(GO_LINES[event_type])

    assert parse_event_data(event, type(expected)) == expected


@by_fixture
def test_go_data_fills_the_registered_payload_of_its_type_key_by_key(line: bytes) -> None:
    """Given any of the 17 Go events, its data decodes into the payload type registered for
    its type, with a field for every key Go wrote (none silently dropped) holding Go's value
    (times to the microsecond)."""
    event = Event.from_json(line)
    data = event.data or {}

    payload = msgspec.to_builtins(parse_event_data(event, payload_types()[event.type]))

    assert set(data) <= set(payload)
    for key, value in data.items():
        if key.endswith("_at"):
            assert abs(_nanos(payload[key]) - _nanos(value)) < 1000, key
        else:
            assert payload[key] == value, key


@by_fixture
def test_reencoding_a_go_event_gives_the_same_json(line: bytes) -> None:
    """When a decoded Go event is re-published, its JSON is Go's except for sub-us digits."""
    go = json.loads(line)

    ours = json.loads(Event.from_json(line).to_json())

    assert abs(_nanos(ours.pop("timestamp")) - _nanos(go.pop("timestamp"))) < 1000
    assert ours == go


@pytest.mark.parametrize(
    "make",
    [
        *(partial(Event.from_json, line) for line in GO_LINES.values()),
        *(case.build for case in CASES),
    ],
    ids=[f"go-{t}" for t in GO_LINES] + [f"py-{case.type}" for case in CASES],
)
def test_to_json_orders_keys_as_go_does(make: Callable[[], Event]) -> None:
    """Given a decoded or a built event, `to_json` writes Go's envelope order, data keys sorted."""
    encoded = json.loads(make().to_json())

    assert list(encoded) == [k for k in GO_ENVELOPE_ORDER if k in encoded]
    for obj in _objects(encoded["data"]):
        assert list(obj) == sorted(obj)


# What a Go service publishes when a slice or map field is nil: `encoding/json` writes null.
GO_NIL_COLLECTIONS: list[tuple[str, type[msgspec.Struct], dict[str, Any]]] = [
    ("pin.requested", PinRequestedEvent, {"policies": [], "constraints": {}}),
    ("plan.ready", PlanReadyEvent, {"assignments": []}),
    ("alert.triggered", AlertTriggeredEvent, {"labels": {}}),
]


def _with_nulls(event_type: str, keys: list[str]) -> bytes:
    """The Go fixture of `event_type` with the data's `keys` set to null (Go's nil)."""
    go = json.loads(GO_LINES[event_type])
    go["data"].update(dict.fromkeys(keys))
    return json.dumps(go, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    ("event_type", "payload_type", "empty"),
    GO_NIL_COLLECTIONS,
    ids=[t for t, _, _ in GO_NIL_COLLECTIONS],
)
def test_go_nil_collections_parse_as_empty(
    event_type: str, payload_type: type[msgspec.Struct], empty: dict[str, Any]
) -> None:
    """Given a Go event whose slices and maps are nil (null), they parse as empty, as in Go."""
    event = Event.from_json(_with_nulls(event_type, list(empty)))

    parsed = parse_event_data(event, payload_type)

    assert {key: getattr(parsed, key) for key in empty} == empty


# --- the Go decoder itself (gowire) --------------------------------------------------------


@pytest.fixture(scope="session")
def gowire(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The gowire checker, built from ../shared/tools/gowire with the Go toolchain."""
    go = shutil.which("go")
    if go is None:
        if os.environ.get("CI"):
            pytest.fail(
                "the Go toolchain (`go`) is not on PATH, so the wire checks against Go cannot run; "
                ".ci/run must install golang-go (apt-get install -y golang-go)",
                pytrace=False,
            )
        pytest.skip("`go` is not installed (apt-get install golang-go) to build gowire")
    work = tmp_path_factory.mktemp("gowire")
    src = work / "src"
    src.mkdir()
    # Copy contents only: the shared folder is read-only and its modes must not follow.
    for file in GOWIRE_SRC.iterdir():
        shutil.copyfile(file, src / file.name)
    env = {
        **os.environ,
        "GOFLAGS": "-mod=mod",
        "GOCACHE": str(work / "gocache"),
        "GOPATH": str(work / "gopath"),
        "CGO_ENABLED": "0",
    }
    built = subprocess.run(
        [go, "build", "-o", "gowire", "."],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if built.returncode != 0:
        pytest.fail(f"go build of gowire failed:\n{built.stdout}{built.stderr}", pytrace=False)
    return src / "gowire"


def _go_check(gowire: Path, jsonl: Path) -> subprocess.CompletedProcess[str]:
    """Run `gowire check < jsonl`: Go decodes each line into its Event and typed payload."""
    with jsonl.open("rb") as stdin:
        return subprocess.run(
            [str(gowire), "check"],
            stdin=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def _write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


@pytest.mark.gowire
def test_go_accepts_its_own_fixtures(gowire: Path) -> None:
    """Given the golden fixtures, Go's decoder accepts all 17 (the checker is sound)."""
    result = _go_check(gowire, FIXTURES)

    assert (result.returncode, result.stdout) == (0, f"ok {len(GO_LINES)}\n")


@pytest.mark.gowire
def test_go_decodes_every_event_python_builds(gowire: Path, tmp_path: Path) -> None:
    """When Python builds each of the 17 events (traced or not), Go decodes them all."""
    lines = [case.build(TRACE_ID).to_json() for case in CASES]
    lines += [case.build("").to_json() for case in CASES]
    # Zero-valued omitempty fields, left out as Go leaves them out.
    lines.append(
        new_exec_progress_event("orchestrator", ExecProgressEvent(workflow_id="w")).to_json()
    )
    jsonl = _write_lines(tmp_path / "python-events.jsonl", lines)

    result = _go_check(gowire, jsonl)

    assert (result.returncode, result.stdout) == (0, f"ok {len(lines)}\n")


def _misspelt_field() -> bytes:
    return GO_LINES["pin.requested"].replace(b'"requested_by"', b'"requestedBy"')


def _mistyped_field() -> bytes:
    return GO_LINES["pin.requested"].replace(b'"size":1024', b'"size":"1 KiB"')


def _zoneless_timestamp() -> bytes:
    go = json.loads(GO_LINES["node.up"])
    go["timestamp"] = "2026-11-26T09:30:15"
    return json.dumps(go).encode()


@pytest.mark.gowire
@pytest.mark.parametrize(
    ("broken", "complaint"),
    [
        (_misspelt_field(), 'unknown field "requestedBy"'),
        (_mistyped_field(), "cannot unmarshal string"),
        (_zoneless_timestamp(), "not a Go Event"),
    ],
    ids=["misspelt-field", "mistyped-field", "zoneless-timestamp"],
)
def test_go_rejects_a_broken_line(
    gowire: Path, tmp_path: Path, broken: bytes, complaint: str
) -> None:
    """Given one bad line after good ones, the check fails on it: these tests can catch a break."""
    good = list(GO_LINES.values())[:3]
    jsonl = _write_lines(tmp_path / "broken.jsonl", [*good, broken])

    result = _go_check(gowire, jsonl)

    assert result.returncode == 1
    assert result.stdout.startswith(f"line {len(good) + 1}")
    assert complaint in result.stdout


@pytest.mark.gowire
def test_go_accepts_nil_collections(gowire: Path, tmp_path: Path) -> None:
    """Given null slices and maps (Go's nil), Go's decoder accepts them; Python must too."""
    lines = [_with_nulls(t, list(empty)) for t, _, empty in GO_NIL_COLLECTIONS]
    jsonl = _write_lines(tmp_path / "nil.jsonl", lines)

    result = _go_check(gowire, jsonl)

    assert (result.returncode, result.stdout) == (0, f"ok {len(lines)}\n")
