"""The operator commands `status`, `check`, `publish` and `tail`, on a real server.

`status`, `check` and `publish` run in-process through click's `CliRunner`, in a thread beside
the test's event loop; `tail` runs as a subprocess, since it follows the stream until SIGINT.
Times, ages, sizes and the server's name vary from run to run: the golden tests replace them
with placeholders before comparing.
"""

from __future__ import annotations

import functools
import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import anyio.to_thread
import click
import pytest
from click.testing import CliRunner, Result
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from gdc_worker import (
    App,
    DeadLetterQueue,
    Event,
    EventBusError,
    NATSConfig,
    NATSEventBus,
    PublishError,
    PublishRefused,
    Reject,
    new_node_down_event,
)
from gdc_worker.bus import ConsumerState, StreamLimits, StreamState
from gdc_worker.bus.publish import TRY_TIMEOUT_S
from gdc_worker.cli import main
from gdc_worker.cli.status import Snapshot
from gdc_worker.cli.tail import NOT_AN_EVENT_SHOWN
from gdc_worker.server import NATSServer, find_nats_server
from gdc_worker.testing import isolated_config
from tests.processes import GDC_WORKER, Process, worker_env
from tests.support import (
    consumer_info,
    dead_letters,
    eventually,
    free_port,
    frozen,
    node_up,
    running,
    wait_until,
    worker_for,
)

pytestmark = pytest.mark.anyio

#: Deadline for a subprocess to print what it should.
SOON = 20.0
_PLACEHOLDERS = (
    (re.compile(r"\b\d+(?:\.\d+)?s\b"), "<age>"),  # a test's ages are seconds
    (re.compile(r"\b\d+(?:\.\d+)? (?:B|KiB|MiB)\b"), "<size>"),
    (re.compile(r"\b\d+\.\d+%"), "<pct>"),
    (re.compile(r"leader \S+"), "leader <server>"),
)


class Tails(Protocol):
    def __call__(self, *args: str) -> Process: ...


@pytest.fixture
def tails(tmp_path: Path, nats_config: NATSConfig) -> Iterator[Tails]:
    """Start `gdc-worker tail ARGS...` subprocesses on the test's stream; any still running
    afterwards is killed."""
    started: list[Process] = []

    def start(*args: str) -> Process:
        process = Process(
            ["tail", *args], worker_env(nats_config), tmp_path / f"tail-{len(started)}"
        )
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


def normalised(text: str) -> list[list[str]]:
    """The lines of `text` as words, with ages, sizes, percentages and the leader replaced."""
    lines = []
    for line in text.splitlines():
        for pattern, placeholder in _PLACEHOLDERS:
            line = pattern.sub(placeholder, line)
        lines.append(line.split())
    return lines


async def cli(config: NATSConfig, *args: str) -> Result:
    """`gdc-worker ARGS...` on the test's streams (GDC_NATS_* of `config`)."""
    invoke = functools.partial(CliRunner().invoke, main, list(args), env=worker_env(config))
    return await anyio.to_thread.run_sync(invoke)


async def gdc_worker_process(
    command: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """`gdc-worker COMMAND...` run to its end in a process of its own, with `env`."""
    run = functools.partial(
        subprocess.run, [GDC_WORKER, *command], env=env, capture_output=True, text=True
    )
    return await anyio.to_thread.run_sync(run)


def auditing(config: NATSConfig) -> App:
    """An app whose `audit` handler (durable `ops-audit`) rejects the node.up of `bad-*`."""
    app = App("ops", config)

    @app.on("node.up")
    async def audit(event: Event) -> None:
        if str((event.data or {}).get("node_id", "")).startswith("bad"):
            raise Reject("a bad node")

    return app


async def audited_backlog(bus: NATSEventBus, jetstream: JetStreamContext) -> None:
    """Four node.up events (two of them bad) audited by `ops-audit`, two dead-lettered, and
    three node.down events waiting on `ops-idle`, which nobody consumes."""
    config = bus.config
    await bus.ensure_consumer("ops-idle", config.subject_for("node.down"))
    for node in ("n-1", "bad-1", "n-2", "bad-2"):
        await bus.publish_event(node_up(node))
    for node in ("n-1", "n-2", "n-3"):
        await bus.publish_event(new_node_down_event("health-monitor", node, "gone"))
    async with running(worker_for(auditing(config), config)):
        await dead_letters(bus, count=2)
        await consumer_info(jetstream, config.stream_name, "ops-audit")
    # The stopped worker's pull requests are dropped once the server sees nobody listens.
    await consumer_info(
        jetstream, config.stream_name, "ops-audit", until=lambda info: info.num_waiting == 0
    )


async def test_status_shows_the_stream_each_consumer_and_the_dead_letters(
    event_bus: NATSEventBus, jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given a stream of 7 events: 4 node.up audited by `ops-audit` (2 dead-lettered), and 3
    node.down waiting on `ops-idle`,
    when `status` runs,
    then it prints the stream line (counts, use of its limits, ages, replicas and leader), an
    aligned row per consumer with lag = pending + ack pending, and the dead letters per
    consumer and event type; exit 0."""
    await audited_backlog(event_bus, jetstream)
    up, down = nats_config.subject_for("node.up"), nats_config.subject_for("node.down")

    result = await cli(nats_config, "status")

    assert result.exit_code == 0, result.output
    assert normalised(result.output) == [
        f"stream {nats_config.stream_name}: 7 messages; <size>; <pct> of 1,000,000 messages, "
        "<pct> of 1d; first <age> ago, last <age> ago; 1 replica, leader <server>".split(),
        [],
        [
            "CONSUMER",
            "FILTER",
            "LAG",
            "PENDING",
            "ACK",
            "PENDING",
            "REDELIVERED",
            "WAITING",
            "OLDEST",
            "UNACKED",
            "LAST",
            "ACTIVE",
            "PAUSED",
        ],
        f"ops-audit {up} 0 0 0 0 0 - <age> ago -".split(),
        f"ops-idle {down} 3 3 0 0 0 <age> never -".split(),
        [],
        f"dead letters ({nats_config.dlq_stream_name}): 2".split(),
        ["CONSUMER", "EVENT", "TYPE", "COUNT"],
        ["ops-audit", "node.up", "2"],
    ]
    header, *rows = result.output.splitlines()[2:5]
    lag_end, active = header.index("LAG") + len("LAG"), header.index("LAST ACTIVE")
    for row in rows:  # numbers end under their heading, the rest start under theirs
        assert row[lag_end - 1] != " "
        assert row[lag_end] == " "
        assert row[active - 1] == " "
        assert row[active] != " "


async def test_status_json_has_the_stream_the_consumers_and_the_dead_letters(
    event_bus: NATSEventBus, jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given the same audited backlog,
    when `status --json` runs,
    then it prints one object: `stream` (name, messages, bytes...), `consumers` (name,
    filter as a list, lag, pending, ack_pending, redelivered...) and `dead_letters`
    (consumer, event_type, count)."""
    await audited_backlog(event_bus, jetstream)

    result = await cli(nats_config, "status", "--json")

    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    stream = status["stream"]
    assert (stream["name"], stream["messages"], stream["replicas"]) == (
        nats_config.stream_name,
        7,
        1,
    )
    assert stream["bytes"] > 0
    assert stream["limits"]["max_msgs"] == 1_000_000
    consumers = [
        {k: v for k, v in c.items() if k not in ("last_active", "oldest_unacked_age_s")}
        for c in status["consumers"]
    ]
    common = {"ack_pending": 0, "redelivered": 0, "waiting": 0, "paused": False}
    assert consumers == [
        {"name": "ops-audit", "filter": [nats_config.subject_for("node.up")], "lag": 0,
         "pending": 0, **common},
        {"name": "ops-idle", "filter": [nats_config.subject_for("node.down")], "lag": 3,
         "pending": 3, **common},
    ]  # fmt: skip
    assert status["consumers"][1]["oldest_unacked_age_s"] > 0
    assert status["dead_letters"] == [
        {"consumer": "ops-audit", "event_type": "node.up", "count": 2}
    ]


async def half_done(bus: NATSEventBus, jetstream: JetStreamContext) -> float:
    """10 node.up events on `ops-half`, 6 of them fetched and the first 4 acked; returns the
    time (epoch seconds) just before the 5th was published."""
    config = bus.config
    await bus.ensure_consumer("ops-half", config.subject_for("node.up"))
    fifth = 0.0
    for i in range(10):
        if i == 4:
            fifth = time.time()
        await bus.publish_event(node_up(f"n-{i}"))
    sub = await jetstream.pull_subscribe_bind("ops-half", config.stream_name)
    fetched = await sub.fetch(6, timeout=10)
    assert len(fetched) == 6
    for message in fetched[:4]:
        await message.ack_sync()
    await sub.unsubscribe()
    return fifth


async def test_lag_and_the_oldest_unacked_age_match_what_was_consumed(
    event_bus: NATSEventBus, jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given 10 events on a consumer that fetched 6 and acked the first 4,
    when the bus reads the consumer's state,
    then pending is 4, ack pending 2 and lag 6, and the oldest unacked event is the 5th: its
    age is at most the time since it was published."""
    fifth = await half_done(event_bus, jetstream)

    state = await event_bus.consumer_state("ops-half")

    assert state is not None
    assert (state.pending, state.ack_pending, state.lag) == (4, 2, 6)
    assert 0 < state.oldest_unacked_age_s <= time.time() - fifth


HEALTHY = (
    "OK: stream {stream}, 1 consumer: highest lag 6 (ops-half), oldest unacked <age> (ops-half)"
)


@pytest.mark.parametrize(
    ("thresholds", "code", "verdict"),
    [
        ((), 0, HEALTHY),
        (("--max-lag", "6", "--max-age", "3600"), 0, HEALTHY),
        (("--max-lag", "5"), 1, "FAIL: consumer ops-half: lag 6 is above 5"),
        (
            ("--max-age", "0"),
            1,
            "FAIL: consumer ops-half: oldest unacked event is <age> old, above <age>",
        ),
        (("--consumer", "nobody"), 1, "FAIL: consumer nobody does not exist on {stream}"),
    ],
    ids=["no-thresholds", "within", "lag-above", "age-above", "missing-consumer"],
)
async def test_check_exits_0_when_healthy_and_1_with_one_line_of_why(
    event_bus: NATSEventBus,
    jetstream: JetStreamContext,
    nats_config: NATSConfig,
    thresholds: tuple[str, ...],
    code: int,
    verdict: str,
) -> None:
    """Given a consumer with lag 6 (4 pending, 2 unacked),
    when `check` runs with these thresholds,
    then it prints one OK line (exit 0), or one FAIL line naming the consumer, the value and
    the threshold (exit 1)."""
    await half_done(event_bus, jetstream)

    result = await cli(nats_config, "check", *thresholds)

    assert normalised(result.output) == [verdict.format(stream=nats_config.stream_name).split()]
    assert result.exit_code == code


async def test_check_app_warns_on_settings_that_cannot_work(
    event_bus: NATSEventBus, jetstream: JetStreamContext, nats_config: NATSConfig
) -> None:
    """Given the app `tests.apps.misconfigured` (a timeout over ack_wait, more backoff steps
    than redeliveries, max_ack_pending 8 for 4 calls per process) and its `fine` handler's
    consumer created by another service with other options,
    when `check APP --processes 4` runs,
    then it prints one WARN line per problem, notes the consumers no worker created yet,
    ends with the OK line of the health check, and exits 1."""
    await jetstream.add_consumer(
        nats_config.stream_name,
        ConsumerConfig(
            durable_name="ops-fine",
            filter_subject=nats_config.subject_for("zone.down"),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=5.0,
            max_ack_pending=100,
        ),
    )

    result = await cli(nats_config, "check", "tests.apps.misconfigured:app", "--processes", "4")

    assert result.output.splitlines() == [
        "note: consumer ops-slow does not exist yet (a worker creates it)",
        "note: consumer ops-eager does not exist yet (a worker creates it)",
        "note: consumer ops-narrow does not exist yet (a worker creates it)",
        "WARN: handler slow: timeout 60s is longer than ack_wait 30s: an attempt outlives the "
        "ack wait, and the event is delivered again whenever the worker cannot keep extending "
        "it (a blocked loop, a lost connection)",
        "WARN: handler eager: backoff has 6 steps, but max_deliver 3 redelivers 2 times at "
        "most: 3s, 4s, 5s, 6s never apply",
        "WARN: handler narrow: max_ack_pending 8 is below replicas x concurrency = 4 x 4 = 16: "
        "some handler slots stay idle",
        "WARN: consumer ops-fine differs from handler fine: ack_wait 5s (ours 30s); "
        "max_ack_pending 100 (ours 1,000)",
        f"OK: stream {nats_config.stream_name}, 1 consumer: highest lag 0 (ops-fine), oldest "
        "unacked 0.0s (ops-fine)",
    ]
    assert result.exit_code == 1


async def test_publish_checks_a_typed_payload_and_stores_nothing_when_it_is_bad(
    event_bus: NATSEventBus, nats_config: NATSConfig
) -> None:
    """Given a pin.requested payload whose size is a string,
    when `publish` runs, then it exits 1 with one error line naming the field, and the stream
    holds nothing; with a good payload it prints the sequence, and the stored event carries
    the data, the cid as its subject, the source and the trace id."""
    bad = await cli(nats_config, "publish", "pin.requested", "--data", '{"cid": "c", "size": "x"}')
    good = await cli(
        nats_config,
        "publish",
        "pin.requested",
        "--data",
        '{"cid": "bafy1", "size": 3}',
        "--source",
        "ops",
        "--trace-id",
        "t-1",
    )

    [line] = bad.stderr.splitlines()
    assert line.startswith("Error: data of pin.requested event ")
    assert "`$.size`" in line
    assert bad.exit_code == 1
    assert good.exit_code == 0, good.output
    assert good.stdout.endswith(f"as #1 in {nats_config.stream_name}\n")
    stored = await event_bus.get_message(nats_config.stream_name, 1)
    assert stored is not None
    assert await event_bus.get_message(nats_config.stream_name, 2) is None
    event = Event.from_json(stored.data)
    assert (event.type, event.subject, event.source, event.trace_id, event.data) == (
        "pin.requested",
        "bafy1",
        "ops",
        "t-1",
        {"cid": "bafy1", "size": 3},
    )


@pytest.mark.parametrize("trace_id", ["t-1\nX-Injected: 1", "t-1\x1b[2J", " t-1", "t-1\t"])
async def test_publish_refuses_a_trace_id_its_header_cannot_carry_as_given(
    event_bus: NATSEventBus, nats_config: NATSConfig, trace_id: str
) -> None:
    """Given a --trace-id with a line break, an escape sequence, or surrounding spaces (which
    nats-py rewrites in the Gdc-Trace-Id header, so that header and envelope would differ),
    when `publish` runs with it,
    then it exits 2 with one line naming the option, and nothing is stored."""
    result = await cli(nats_config, "publish", "node.up", "--trace-id", trace_id)

    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"Error: --trace-id {trace_id!r}: control characters and surrounding")
    assert await event_bus.get_message(nats_config.stream_name, 1) is None


async def test_publish_refuses_a_type_no_gdc_service_handles_or_a_blank_source(
    event_bus: NATSEventBus, nats_config: NATSConfig
) -> None:
    """Given a TYPE with a typo (`pin.requsted`), one of the user's own (`audit.logged`), and
    a blank --source (an unset shell variable),
    when `publish` runs with each,
    then all exit 2 with one line naming the type (the typo with the type it is close to) or
    the option, and nothing is stored; with --any-type the user's own type is published as
    given."""
    typo = await cli(nats_config, "publish", "pin.requsted", "--data", '{"cid": "c"}')
    own = await cli(nats_config, "publish", "audit.logged")
    no_source = await cli(nats_config, "publish", "node.up", "--source", " ")
    told = await cli(
        nats_config, "publish", "audit.logged", "--any-type", "--data", '{"who": "ops"}'
    )

    [typo_line] = typo.stderr.splitlines()
    assert (typo.exit_code, own.exit_code) == (2, 2)
    assert "'pin.requsted' is not a GDC event type (did you mean 'pin.requested'?)" in typo_line
    assert "--any-type" in typo_line
    assert "'audit.logged' is not a GDC event type, so" in own.stderr
    assert (no_source.exit_code, no_source.stderr) == (
        2,
        "Error: --source is empty: name the publishing service\n",
    )
    assert told.exit_code == 0, told.output
    stored = await event_bus.get_message(nats_config.stream_name, 1)
    assert stored is not None
    assert await event_bus.get_message(nats_config.stream_name, 2) is None
    event = Event.from_json(stored.data)
    assert (event.type, event.data) == ("audit.logged", {"who": "ops"})
    assert stored.subject == nats_config.subject_for("audit.logged")


async def test_publish_takes_only_standard_json_and_a_utf8_file_with_a_bom(
    event_bus: NATSEventBus, nats_config: NATSConfig, tmp_path: Path
) -> None:
    """Given --data holding NaN or Infinity (which JSON does not have, and which the stored
    event would hold as null), and a UTF-8 file that starts with a BOM (as editors on Windows
    write),
    when `publish` runs with each,
    then the first two exit 2 with one line naming the value, and store nothing; the file's
    event is published with its data."""
    data_file = tmp_path / "node.json"
    data_file.write_bytes('\ufeff{"node_id": "n\u00e9"}'.encode())

    refused = [
        await cli(nats_config, "publish", "node.up", "--data", data)
        for data in ('{"node_id": "n", "load": NaN}', '{"node_id": "n", "load": -Infinity}')
    ]
    published = await cli(nats_config, "publish", "node.up", "--data", f"@{data_file}")

    for result, value in zip(refused, ("NaN", "-Infinity"), strict=True):
        assert result.exit_code == 2
        [line] = result.stderr.splitlines()
        assert line == f"Error: --data: not JSON: {value} is not a JSON number"
    assert published.exit_code == 0, published.output
    stored = await event_bus.get_message(nats_config.stream_name, 1)
    assert stored is not None
    assert Event.from_json(stored.data).data == {"node_id": "n\u00e9"}
    assert await event_bus.get_message(nats_config.stream_name, 2) is None


async def test_tail_prints_live_events_without_touching_a_durable_and_ends_0_on_sigint(
    event_bus: NATSEventBus, nats_config: NATSConfig, tails: Tails
) -> None:
    """Given a durable consumer with 1 event pending, and `tail --new --json` following,
    when two events and a message that is not an event are published, and SIGINT is sent,
    then tail prints each as one JSON line (the envelopes, then the bytes marked
    `not_an_event`), exits 0, and the durable still has every message pending, and is the
    stream's only consumer."""
    await event_bus.ensure_consumer("ops-durable", nats_config.subject_for(">"))
    await event_bus.publish_event(node_up("before"))
    tail = tails("--new", "--json")
    await tail.wait_for(re.compile(r"^following ", re.M), timeout=SOON)
    events = [node_up("live-1"), new_node_down_event("health-monitor", "live-2", "gone")]

    for event in events:
        await event_bus.publish_event(event)
    await event_bus.publish_raw(nats_config.subject_for("node.up"), b"\xff not json", {})
    lines = await _lines(tail, 3)
    tail.send(signal.SIGINT)

    assert await tail.exit_code() == 0, tail.stderr
    assert [json.loads(line).get("id") for line in lines[:2]] == [e.id for e in events]
    assert json.loads(lines[2]) == {
        "not_an_event": True,
        "seq": 4,
        "subject": nats_config.subject_for("node.up"),
        "data": "\\xff not json",
    }
    state = await event_bus.consumer_state("ops-durable")
    assert state is not None
    assert (state.pending, state.ack_pending) == (4, 0)
    assert [c.name for c in await event_bus.consumer_states()] == ["ops-durable"]


async def test_tail_last_starts_with_the_last_events_of_its_pattern(
    event_bus: NATSEventBus, nats_config: NATSConfig, tails: Tails
) -> None:
    """Given node.up and node.down events interleaved (three node.up at sequences 1, 3, 5),
    when `tail node.up --last 2` runs, and later gets SIGHUP (its terminal gone),
    then its first lines are the node.up events at sequences 3 and 5, in text, and it ends
    with 0 as on Ctrl-C."""
    for i in range(3):
        await event_bus.publish_event(node_up(f"n-{i}"))
        await event_bus.publish_event(new_node_down_event("health-monitor", f"n-{i}", "gone"))

    tail = tails("node.up", "--last", "2")
    lines = await _lines(tail, 2)
    tail.send(signal.SIGHUP)

    assert [line.split()[0] for line in lines] == ["#3", "#5"]
    assert all(" node.up " in line and "subject=n-" in line for line in lines)
    assert await tail.exit_code() == 0, tail.stderr


async def test_tail_prints_each_event_on_one_line_escaping_control_characters(
    event_bus: NATSEventBus, nats_config: NATSConfig, tails: Tails
) -> None:
    """Given an event (from another service) whose source holds a newline and whose subject
    is a terminal escape sequence, then a plain event,
    when `tail --last 2` prints them as text,
    then each is one line, the control characters shown escaped, not sent to the terminal."""
    envelope = node_up("n-1").to_json().decode()
    odd = envelope.replace('"source":"', '"source":"a\\nb').replace(
        '"subject":"n-1"', '"subject":"\\u001b[2J"'
    )
    await event_bus.publish_raw(nats_config.subject_for("node.up"), odd.encode(), {})
    await event_bus.publish_event(node_up("n-2"))

    tail = tails("--last", "2")
    lines = await _lines(tail, 2)
    tail.send(signal.SIGINT)

    assert "source=a\\nb" in lines[0]
    assert "subject=\\x1b[2J" in lines[0]
    assert "\x1b" not in tail.stdout
    assert lines[1].startswith("#2 ")
    assert await tail.exit_code() == 0, tail.stderr


async def test_tail_shows_the_start_of_a_large_message_that_is_not_an_event(
    event_bus: NATSEventBus, nats_config: NATSConfig, tails: Tails
) -> None:
    """Given a 100 kB binary message that is not an event, then a short one,
    when `tail --last 2` prints them as text,
    then the large one shows its first bytes and how many more there are (not 400 kB of
    escapes on one line), and the short one shows whole."""
    subject = nats_config.subject_for("node.up")
    large, short = bytes(range(256)) * 400, b"\xff short"
    await event_bus.publish_raw(subject, large, {})
    await event_bus.publish_raw(subject, short, {})

    tail = tails("--last", "2")
    lines = await _lines(tail, 2)
    tail.send(signal.SIGINT)

    shown = large[:NOT_AN_EVENT_SHOWN]
    assert lines[0].endswith(
        f"{subject}: not an event: {shown!r}... ({len(large) - len(shown)} more bytes; "
        "--json prints them)"
    )
    assert lines[1].endswith(f"{subject}: not an event: {short!r}")
    assert await tail.exit_code() == 0, tail.stderr


async def _lines(process: Process, count: int) -> list[str]:
    """The first `count` lines the process printed, once there are that many."""
    with anyio.fail_after(SOON):
        while len(lines := process.stdout.splitlines()) < count:
            await anyio.sleep(0.05)
    return list(lines[:count])


@pytest.mark.parametrize(
    "command",
    [["status"], ["check"], ["tail", "--new"], ["publish", "node.up"]],
    ids=lambda command: command[0],
)
async def test_each_command_exits_4_when_nats_cannot_be_reached(
    nats_config: NATSConfig, command: list[str]
) -> None:
    """Given a URL where nothing listens,
    when the command runs (as a process: `tail` needs the main thread for its signals),
    then it exits 4 with one error line naming the URL."""
    url = f"nats://127.0.0.1:{free_port()}"

    env = worker_env(nats_config, GDC_NATS_URL=url)
    result = await gdc_worker_process(command, env)

    assert result.returncode == 4, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"Error: cannot connect to NATS at {url}: ")


@pytest.fixture(scope="module", params=["server", "account"])
def no_jetstream(request: pytest.FixtureRequest) -> Iterator[str]:
    """The URL of a real nats-server without JetStream: run without `-js`, or (the way a
    shared server is) with JetStream for another account only."""
    if request.param == "account":
        users = "users: [{user: ops, password: ops}]"
        config = f"accounts {{ OTHER: {{ jetstream: enabled }}, OPS: {{ {users} }} }}\n"
        with NATSServer(config=config) as server:
            yield f"nats://ops:ops@127.0.0.1:{server.port}"
        return
    port = free_port()
    args = [find_nats_server(), "-a", "127.0.0.1", "-p", str(port)]
    with subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as server:
        try:
            wait_until(lambda: _listening(port), "nats-server without -js listening")
            yield f"nats://127.0.0.1:{port}"
        finally:
            server.terminate()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["check"],
        ["tail", "--new"],
        ["tail", "--last", "3"],
        ["dlq", "list"],
        ["stream", "apply"],
        ["run", "tests.apps.metered:app"],
    ],
    ids=" ".join,
)
async def test_each_command_exits_4_on_a_server_without_jetstream(
    nats_config: NATSConfig, no_jetstream: str, command: list[str]
) -> None:
    """Given a server that answers, but has no JetStream for this connection,
    when the command runs,
    then it exits 4, as for a server out of reach, with one error line saying that JetStream
    is missing (not a 503 from deep inside nats-py)."""
    env = worker_env(nats_config, GDC_NATS_URL=no_jetstream)
    result = await gdc_worker_process(command, env)

    assert result.returncode == 4, result.stderr
    [line] = result.stderr.splitlines()
    assert "JetStream" in line, line
    assert "not enabled" in line, line
    assert not re.search(r"\w+Error\b", line.removeprefix("Error: ")), line  # no nats-py class


def test_watch_shows_a_lag_that_grew_in_bold_red() -> None:
    """Given two consumers, one whose lag grew since the last refresh and one whose lag fell,
    when the status table is drawn, then only the grown lag's cell is styled, and the rows
    stay aligned once the styling is removed."""
    now = datetime.now(UTC)
    stream = StreamState("S", 9, 900, 1, 9, now, now, StreamLimits(0, 0, 0.0), 1, None)
    consumers = [
        ConsumerState("grew", ("a",), 5, 2, 0, 0, now, False, 1.0),
        ConsumerState("fell", ("b",), 1, 0, 0, 0, None, False, 1.0),
    ]
    snapshot = Snapshot(stream, consumers, {}, "S_DLQ", now)

    lines = snapshot.lines({"grew": 3, "fell": 4})

    styled = [line for line in lines if "\x1b[" in line]
    assert len(styled) == 1
    assert styled[0].startswith("grew")
    assert click.style("7", fg="red", bold=True) in styled[0]
    plain = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in lines]
    assert plain == snapshot.lines()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["check", "--max-age", "nan"], "--max-age"),
        (["check", "--max-age", "inf"], "--max-age"),
        (["status", "--watch", "nan"], "--watch"),
        (["status", "--watch", "inf"], "--watch"),
        (["check", "--consumer", ""], "--consumer"),
        (["check", "--consumer", "a.b"], "--consumer"),
        (["check", "--consumer", "a b"], "--consumer"),
        (["check", "--consumer", "orders-*"], "--consumer"),
    ],
)
async def test_an_option_value_that_cannot_mean_anything_is_bad_usage_naming_it(
    nats_config: NATSConfig, event_bus: NATSEventBus, args: list[str], named: str
) -> None:
    """Given a stream,
    when `check` gets a NaN or infinite age, or a consumer name JetStream cannot have, or
    `status` a NaN or infinite watch interval,
    then it exits 2 with an error naming the option, and no traceback: a probe whose NaN
    threshold never fails would report a stuck consumer healthy."""
    result = await cli(nats_config, *args)

    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert named in result.stderr
    assert "Traceback" not in result.output


async def test_status_watch_into_a_reader_that_stops_ends_0_quietly(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given a stream,
    when `status --watch --json` writes into a pipe whose reader stops after one line
    (`| head -1`),
    then it ends with exit 0 and says nothing on stderr, as `tail` does."""

    def first_line_then_close() -> tuple[str, int, str]:
        command = [GDC_WORKER, "status", "--watch", "0.1", "--json"]
        with subprocess.Popen(
            command,
            env=worker_env(nats_config),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as process:
            assert process.stdout is not None
            assert process.stderr is not None
            line = process.stdout.readline()
            process.stdout.close()
            code = process.wait(timeout=SOON)
            return line, code, process.stderr.read()

    line, code, stderr = await anyio.to_thread.run_sync(first_line_then_close)

    assert json.loads(line)["stream"]["name"] == nats_config.stream_name
    assert code == 0, stderr
    assert stderr == ""


@pytest.mark.parametrize(
    "args",
    [["tail", ""], ["tail", "node..up"], ["tail", "a b"], ["publish", "a b", "--any-type"]],
)
async def test_a_pattern_or_type_that_is_no_subject_is_bad_usage(
    nats_config: NATSConfig, event_bus: NATSEventBus, args: list[str]
) -> None:
    """Given a stream,
    when `tail` gets a PATTERN or `publish` a TYPE that cannot be a subject,
    then it exits 2 (bad usage, as for a TYPE that is not a GDC one) with one error line
    naming it, and nothing is published."""
    result = await cli(nats_config, *args)

    assert result.exit_code == 2, result.output
    assert repr(args[1]) in result.stderr
    state = await event_bus.stream_state()
    assert state is not None
    assert state.messages == 0


#: A user who may read stream and consumer info, and nothing else of JetStream's API.
_READ_INFO_ONLY = """
authorization {
  users = [
    {user: admin, password: admin}
    {user: viewer, password: viewer, permissions: {
      publish: {allow: ["$JS.API.INFO", "$JS.API.STREAM.INFO.>", "$JS.API.CONSUMER.INFO.>",
                        "$JS.API.CONSUMER.NAMES.>"]}
      subscribe: {allow: ["_INBOX.>"]}
    }}
  ]
}
"""


@pytest.fixture(scope="module")
def limited_server() -> Iterator[NATSServer]:
    with NATSServer(config=_READ_INFO_ONLY) as server:
        yield server


@pytest.mark.parametrize(
    ("command", "denied"),
    [
        (["status"], "$JS.API.STREAM.MSG.GET."),
        (["dlq", "list"], "$JS.API.CONSUMER.CREATE."),
        (["dlq", "show", "1"], "$JS.API.STREAM.MSG.GET."),
        (["tail", "--last", "2"], "$JS.API.CONSUMER.CREATE."),
    ],
)
async def test_a_user_without_permission_is_told_so_not_that_nats_timed_out(
    limited_server: NATSServer, command: list[str], denied: str
) -> None:
    """Given a stream with an event and a dead letter and a consumer behind, and a user who
    may read stream and consumer info only,
    when that user runs the command,
    then it exits 1 with one error line saying the server refused that API request for lack
    of permission, not a bare timeout."""
    admin = NATSConfig(url=f"nats://admin:admin@127.0.0.1:{limited_server.port}")
    async with await NATSEventBus.connect(admin) as bus:
        await bus.publish_event(node_up("n-1"))
        await bus.ensure_consumer("audit", admin.subject_for(">"))
        await DeadLetterQueue(bus).ensure()
        await bus.publish_raw(f"{admin.dlq_subject_prefix}.x.y", b"not a record", {})
    viewer = admin.replace(url=f"nats://viewer:viewer@127.0.0.1:{limited_server.port}")

    # A refused request times out: a short timeout keeps the test short.
    result = await gdc_worker_process(command, worker_env(viewer, GDC_NATS_CONNECT_TIMEOUT="2"))

    assert result.returncode == 1, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: ")
    assert "permission denied: " in line
    assert denied.lower() in line


async def test_a_worker_whose_user_may_not_create_its_consumer_is_told_so_at_once(
    limited_server: NATSServer,
) -> None:
    """Given a stream and dead-letter stream an admin set up, and a user who may read stream
    and consumer info only,
    when that user runs a worker, whose consumer does not exist yet,
    then it exits 1 at the first refused request, its last line saying permission was denied
    for the consumer create, not after asking again for three request timeouts."""
    admin = NATSConfig(url=f"nats://admin:admin@127.0.0.1:{limited_server.port}")
    async with await NATSEventBus.connect(admin) as bus:
        await DeadLetterQueue(bus).ensure()
    viewer = admin.replace(url=f"nats://viewer:viewer@127.0.0.1:{limited_server.port}")
    env = worker_env(viewer, GDC_NATS_CONNECT_TIMEOUT="2")

    started = time.monotonic()
    result = await gdc_worker_process(["run", "tests.apps.metered:app"], env)

    assert result.returncode == 1, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("Error: ")
    assert "permission denied: " in last
    assert "$js.api.consumer.create." in last
    assert "asking again" not in result.stderr
    assert time.monotonic() - started < 3 * 2


async def test_publish_by_a_user_who_may_not_publish_events_is_told_so_at_once(
    limited_server: NATSServer,
) -> None:
    """Given a user who may read stream and consumer info only,
    when that user publishes an event,
    then it exits 1 with one line saying the server denied the publish to the event's
    subject, as soon as the server refuses it, not after retrying for the connect timeout."""
    admin = NATSConfig(url=f"nats://admin:admin@127.0.0.1:{limited_server.port}")
    async with await NATSEventBus.connect(admin):
        pass  # creates the stream
    viewer = admin.replace(url=f"nats://viewer:viewer@127.0.0.1:{limited_server.port}")

    started = time.monotonic()
    result = await gdc_worker_process(["publish", "node.up"], worker_env(viewer))

    assert result.returncode == 1, result.stderr
    [line] = result.stderr.splitlines()
    assert "permission denied: " in line
    assert f'"{admin.subject_for("node.up")}"' in line
    assert time.monotonic() - started < admin.connect_timeout


async def test_a_request_that_gets_no_answer_after_an_earlier_refusal_is_not_called_refused(
    limited_server: NATSServer,
) -> None:
    """Given a user's bus that the server refused a request (reading a stored message),
    when a request that user may make (the stream's info) later gets no answer (the server
    frozen),
    then it fails as a timeout, not as a permission refusal (which the worker's setup would
    not ask again after): only a refusal of that very request counts."""
    admin = NATSConfig(url=f"nats://admin:admin@127.0.0.1:{limited_server.port}")
    async with await NATSEventBus.connect(admin) as bus:
        await bus.publish_event(node_up("n-1"))
    viewer = admin.replace(
        url=f"nats://viewer:viewer@127.0.0.1:{limited_server.port}", connect_timeout=1.0
    )
    async with await NATSEventBus.connect(viewer, setup_stream=False) as bus:
        with pytest.raises(
            EventBusError, match=r'permission denied: .*"\$js\.api\.stream\.msg\.get'
        ):
            await bus.get_message(viewer.stream_name, 1)
        async with frozen(limited_server):
            with pytest.raises(EventBusError) as no_answer:
                await bus.stream_state()

        assert "permission" not in str(no_answer.value)
        assert "timeout" in str(no_answer.value)
        assert await bus.stream_state() is not None  # the user may read it: nothing refused


async def test_publishes_the_server_refuses_fail_at_once_saying_permission_denied(
    limited_server: NATSServer,
) -> None:
    """Given a user who may not publish events, with a connect timeout of 10 s,
    when that user's bus publishes one event with `publish_event_async`, another with
    `send_event` (as `ctx.publish` does), and a third with `publish_event`,
    then `flush()`, the pending publish and `publish_event` fail with permission denied,
    naming the event's subject, as soon as the server refuses them: not "no acknowledgement
    within 10s" once the timeout is over, nor after a second try's timeout (2 s), as if
    sending again could help."""
    admin = NATSConfig(url=f"nats://admin:admin@127.0.0.1:{limited_server.port}")
    async with await NATSEventBus.connect(admin):
        pass  # creates the stream
    viewer = admin.replace(
        url=f"nats://viewer:viewer@127.0.0.1:{limited_server.port}", connect_timeout=10.0
    )
    subject = f'"{admin.subject_for("node.up")}"'
    async with await NATSEventBus.connect(viewer, setup_stream=False) as bus:
        with anyio.fail_after(viewer.connect_timeout / 2):
            await bus.publish_event_async(node_up("n-1"))
            pending = await bus.send_event(node_up("n-2"))
            with pytest.raises(PublishError) as flushed:
                await bus.flush()
            with pytest.raises(PublishError) as sent:
                await pending
        with anyio.fail_after(TRY_TIMEOUT_S / 2), pytest.raises(PublishRefused) as published:
            await bus.publish_event(node_up("n-3"))

    for failure in (flushed.value, sent.value, published.value):
        assert "permission denied: the server says permissions violation" in str(failure)
        assert subject in str(failure)


async def test_status_watch_outlives_a_server_that_stops_answering_for_a_while(
    tmp_path: Path,
) -> None:
    """Given `status --watch --json` on a server that answers,
    when the server stops answering for longer than a request's timeout, then goes on,
    then the watch says on stderr, in one line, that a refresh failed, goes on refreshing,
    shows the stream again once the server answers, and ends 0 on SIGINT: a dashboard must
    not die of the very outage it is watched for."""
    with NATSServer() as server:
        config = isolated_config(server.url)
        async with await NATSEventBus.connect(config):
            pass  # creates the stream
        watch = Process(
            ["status", "--watch", "0.2", "--json"],
            worker_env(config, GDC_NATS_CONNECT_TIMEOUT="1"),
            tmp_path / "watch",
        )
        try:
            await eventually(lambda: watch.stdout.count("\n") >= 1, "a first snapshot", SOON)
            async with frozen(server):
                await watch.wait_for(re.compile(r"^Error: .*retrying", re.M), timeout=SOON)
            shown = watch.stdout.count("\n")
            await eventually(lambda: watch.stdout.count("\n") > shown, "a snapshot again", SOON)
            watch.send(signal.SIGINT)

            assert await watch.exit_code() == 0, watch.stderr
        finally:
            watch.close()
    last = json.loads(watch.stdout.splitlines()[-1])
    assert last["stream"]["name"] == config.stream_name
    assert all(line.startswith("Error: ") for line in watch.stderr.splitlines())


async def test_tail_of_a_stream_deleted_under_it_says_so_and_exits_1(
    event_bus: NATSEventBus, nats_config: NATSConfig, jetstream: JetStreamContext, tails: Tails
) -> None:
    """Given `tail --new` following the stream,
    when the stream is deleted (and created again, empty),
    then tail does not sit there silent, printing nothing for ever: it exits 1 with one
    error line saying the stream it followed was deleted."""
    tail = tails("--new")
    await tail.wait_for(re.compile(r"^following ", re.M), timeout=SOON)

    await jetstream.delete_stream(nats_config.stream_name)
    await event_bus.ensure_stream(event_bus.event_stream)

    assert await tail.exit_code(timeout=SOON) == 1, tail.stderr
    following, error = tail.stderr.splitlines()
    assert following.startswith("following ")
    assert error.startswith("Error: ")
    assert f"stream {nats_config.stream_name}" in error
    assert "deleted" in error
