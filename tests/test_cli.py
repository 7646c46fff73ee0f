"""The `gdc-worker` command: user mistakes, signals, crashes, replicas, the DLQ tools, the server.

`gdc-worker run` and `gdc-worker server` run as real subprocesses on the session's nats-server,
each on the test's own stream (passed as `GDC_NATS_*` variables, see `worker_env`). The worker
apps live in `tests/apps/` and report each handler call by appending to `$GDC_TEST_OUT`. The
`dlq` commands run in-process through click's `CliRunner`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
import nats
import pytest
from anyio.from_thread import BlockingPortal
from click.testing import CliRunner, Result
from nats.js import JetStreamContext

from gdc_worker import (
    App,
    Event,
    NATSConfig,
    NATSEventBus,
    Reject,
    Worker,
    new_node_down_event,
    new_node_up_event,
)
from gdc_worker.cli import main
from gdc_worker.cli.common import since_time
from tests.processes import (
    EXIT_TIMEOUT,
    GDC_WORKER,
    READY_TIMEOUT,
    RECORDER_DURABLE,
    ROOT,
    SHORT_ACK_DURABLE,
    Spawn,
    clean_env,
    ids,
    node_ups,
    reports,
    worker_env,
)
from tests.support import alive, eventually, free_port, settled, wait_until

T = TypeVar("T")


async def publish(bus: NATSEventBus, events: list[Event]) -> None:
    for event in events:
        await bus.publish_event_async(event)
    await bus.flush()


# -- user mistakes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        pytest.param(
            ["nocolon"],
            3,
            "target 'nocolon' must look like module:app or module.app",
            id="bad-target",
        ),
        pytest.param(
            ["tests.apps.missing:app"],
            3,
            "cannot import 'tests.apps.missing': no module named 'tests.apps.missing'",
            id="missing-module",
        ),
        pytest.param(
            ["tests.apps.recorder:nope"],
            3,
            "module 'tests.apps.recorder' has no attribute 'nope'",
            id="missing-attribute",
        ),
        pytest.param(
            ["tests.apps.recorder:record"],
            3,
            "tests.apps.recorder:record is a function, not a gdc_worker.App",
            id="not-an-app",
        ),
        pytest.param(
            ["tests.apps.broken:app"],
            3,
            "importing 'tests.apps.broken' failed: RuntimeError: GDC_TEST_SETTING is not set",
            id="import-raises",
        ),
        pytest.param(
            ["tests.apps.recorder:app", "--handler", "nope"],
            1,
            "app 'recorder' has no handler named nope; it has: record",
            id="unknown-handler",
        ),
        pytest.param(
            ["tests.apps.recorder:app", "--url", "nats://127.0.0.1:{port}"],
            4,
            "cannot connect to NATS at nats://127.0.0.1:{port}: ConnectionRefusedError",
            id="unreachable-server",
        ),
        pytest.param(
            ["tests.apps.recorder:app", "--url", "nats://alice:s3cr3t@127.0.0.1:99999"],
            1,
            "url: 'nats://alice:***@127.0.0.1:99999' is not a valid NATS URL: port 99999",
            id="url-port-too-big",
        ),
        pytest.param(
            ["tests.apps.recorder:app", "--url", "nats://"],
            1,
            "url: 'nats://' is not a valid NATS URL: no host",
            id="url-no-host",
        ),
        pytest.param(
            ["tests.apps.recorder:app", "--url", "nats://[::1"],
            1,
            "url: 'nats://[::1' is not a valid NATS URL: unbalanced",
            id="url-open-bracket",
        ),
        pytest.param(
            ["tests.apps.recorder:app", "--url", "http://127.0.0.1:{port}"],
            1,
            "url: 'http://127.0.0.1:{port}' is not a valid NATS URL: unknown scheme 'http'",
            id="url-unknown-scheme",
        ),
    ],
)
@pytest.mark.parametrize("processes", ["1", "2"], ids=["one-process", "processes-2"])
def test_run_mistake_exits_with_its_code_and_one_error_line(
    nats_config: NATSConfig, args: list[str], code: int, message: str, processes: str
) -> None:
    """Given a `gdc-worker run` command with a user mistake in it, in one process or two,
    when it runs,
    then it exits with the code named for that kind of mistake (3 import, 4 connect, else 1)
    and one `Error:` line on stderr that names the problem, no traceback (and no password)."""
    port = str(free_port())
    args = [arg.replace("{port}", port) for arg in args]

    result = subprocess.run(
        [GDC_WORKER, "run", *args, "--processes", processes],
        cwd=ROOT,
        env=worker_env(nats_config),
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert "s3cr3t" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: " + message.replace("{port}", port))


def run_command(
    args: Sequence[str], env: dict[str, str], cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    """`gdc-worker ARGS...` to its end; its exit code, stdout and stderr."""
    return subprocess.run(
        [GDC_WORKER, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        pytest.param(
            {"GDC_NATS_CONNECT_TIMEOUT": "nan"},
            "connect_timeout: must be a finite number of seconds, got nan",
            id="timeout-nan",
        ),
        pytest.param(
            {"GDC_NATS_MAX_AGE": "inf"},
            "max_age: must be a finite number of seconds, got inf",
            id="max-age-inf",
        ),
        pytest.param(
            {"GDC_NATS_MAX_MSGS": "1e6"},
            "GDC_NATS_MAX_MSGS: '1e6' is not a valid max_msgs",
            id="max-msgs-float",
        ),
        pytest.param(
            {"GDC_NATS_DLQ_STREAM_NAME": "{stream}"},
            "dlq_stream_name: '{stream}' is also the stream_name",
            id="dlq-stream-is-the-stream",
        ),
        pytest.param(
            {"GDC_NATS_URL": "nats://alice:s3cr3t@[::1"},
            "url: 'nats://alice:***@[::1' is not a valid NATS URL",
            id="url-open-bracket",
        ),
        pytest.param(
            {"GDC_NATS_URL": "{url},nats://alice:s3cr3t@127.0.0.1:0"},
            "url: 'nats://alice:***@127.0.0.1:0' is not a valid NATS URL: port 0",
            id="url-list-with-a-bad-server",
        ),
    ],
)
@pytest.mark.parametrize("processes", ["1", "2"], ids=["one-process", "processes-2"])
def test_run_with_an_invalid_setting_in_the_environment_exits_1_with_one_error_line(
    nats_config: NATSConfig, variables: dict[str, str], message: str, processes: str
) -> None:
    """Given a `GDC_NATS_*` variable with a value the config refuses (a duration that is not
    finite, a limit that is not an integer, the dead-letter stream named as the event stream,
    a malformed URL, one bad server in a list),
    when `gdc-worker run` starts, in one process or two,
    then it exits 1 with exactly one `Error:` line naming the setting (and no password)."""
    fill = {"{stream}": nats_config.stream_name, "{url}": nats_config.url}
    for key, value in fill.items():
        variables = {k: v.replace(key, value) for k, v in variables.items()}
        message = message.replace(key, value)

    result = run_command(
        ["run", "tests.apps.recorder:app", "--processes", processes],
        env=worker_env(nats_config, **variables),
    )

    assert result.returncode == 1, result.stderr
    assert "s3cr3t" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: " + message)


@pytest.mark.anyio
@pytest.mark.parametrize("stream", ["events", "dead letters"])
@pytest.mark.parametrize("processes", ["1", "2"], ids=["one-process", "processes-2"])
async def test_run_on_a_stream_of_another_shape_exits_1_with_only_the_error_line(
    nats_config: NATSConfig, jetstream: JetStreamContext, stream: str, processes: str
) -> None:
    """Given a server where the app's event (or dead-letter) stream exists without the subjects
    the app needs (it belongs to something else),
    when `gdc-worker run` starts, in one process or two,
    then it exits 1 and stderr is exactly one `Error:` line naming the stream: no
    "disconnected" or "closed for good" line from closing the connection on the way out."""
    name = nats_config.stream_name if stream == "events" else nats_config.dlq_stream_name
    await jetstream.add_stream(name=name, subjects=[f"elsewhere.{name.lower()}.>"])

    result = await anyio.to_thread.run_sync(
        lambda: run_command(
            ["run", "tests.apps.recorder:app", "--processes", processes],
            env=worker_env(nats_config),
        )
    )

    assert result.returncode == 1, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"Error: stream {name} exists with other subjects")


IMPORT_FAILURES = {
    "handler_definition": (
        'from gdc_worker import App\napp = App("broken")\n\n'
        '@app.on("pin requested!")\nasync def handle(event):\n    pass\n',
        "handler_definition: ",
    ),
    "exits_at_import": (
        'import sys\nsys.exit("no settings here")\n',
        "importing 'exits_at_import' failed: SystemExit: no settings here",
    ),
    "exits_0_at_import": (
        "raise SystemExit(0)\n",
        "importing 'exits_0_at_import' failed: SystemExit: 0",
    ),
}


@pytest.mark.parametrize("module", sorted(IMPORT_FAILURES))
@pytest.mark.parametrize("processes", ["1", "2"], ids=["one-process", "processes-2"])
def test_run_target_whose_import_raises_anything_exits_3(
    nats_config: NATSConfig, tmp_path: Path, module: str, processes: str
) -> None:
    """Given a target module whose import raises a HandlerDefinitionError, or SystemExit
    (even SystemExit(0)),
    when `gdc-worker run` imports it, in one process or two,
    then it exits 3 (the target cannot be imported) with one `Error:` line saying why."""
    source, message = IMPORT_FAILURES[module]
    (tmp_path / f"{module}.py").write_text(source)

    result = run_command(
        ["run", f"{module}:app", "--processes", processes],
        env=worker_env(nats_config),
        cwd=tmp_path,
    )

    assert result.returncode == 3, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: " + message)


IMPORTED_ONCE = """
import os
from pathlib import Path

from gdc_worker import App

try:
    Path(os.environ["GDC_TEST_OUT"]).touch(exist_ok=False)  # the first import: the supervisor's
except FileExistsError:
    raise RuntimeError("imported again, in a replica") from None

app = App("imported-once")


@app.on("node.up")
async def record(event):
    pass
"""


def test_processes_stop_at_once_with_3_when_the_replicas_cannot_import_the_app(
    nats_config: NATSConfig, tmp_path: Path
) -> None:
    """Given an app whose import succeeds once (in the supervisor) and fails after that
    (in the replicas),
    when `gdc-worker run --processes 2` runs it,
    then the replicas exit 3, and the supervisor logs an ERROR line, restarts none and exits
    3 at once, instead of restarting them forever."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "imported_once.py").write_text(IMPORTED_ONCE)
    env = worker_env(nats_config, GDC_TEST_OUT=str(tmp_path / "imported"))

    result = run_command(["run", "imported_once:app", "--processes", "2"], env=env, cwd=workdir)

    assert result.returncode == 3, result.stderr
    assert re.search(
        r" ERROR .* exited with code 3 \(the app cannot be imported\): restarting cannot help",
        result.stderr,
    )
    assert "Error: importing 'imported_once' failed: RuntimeError: imported again" in result.stderr
    assert len(re.findall(r"replica \d+ started \(pid \d+\)", result.stderr)) == 2


@pytest.mark.parametrize("command", [["run", "tests.apps.recorder:app"], ["dlq", "list"]])
@pytest.mark.parametrize(
    ("option", "variable", "named"),
    [
        pytest.param("", None, "--url", id="option-empty"),
        pytest.param("  ", None, "--url", id="option-blank"),
        pytest.param(None, "", "GDC_NATS_URL", id="variable-empty"),
        pytest.param(None, " ", "GDC_NATS_URL", id="variable-blank"),
    ],
)
def test_empty_url_is_bad_usage_in_one_line(
    command: list[str], option: str | None, variable: str | None, named: str
) -> None:
    """Given `--url ""` or `GDC_NATS_URL=""` (or blank),
    when `gdc-worker run` or `gdc-worker dlq list` starts,
    then it is bad usage (exit 2) in one `Error:` line naming the option or the variable,
    rather than a connection to the default URL or a config error."""
    args = [*command, *(["--url", option] if option is not None else [])]
    env = {"GDC_NATS_URL": variable} if variable is not None else {}

    result = CliRunner().invoke(main, args, env=env)

    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [
        f"Error: {named} is empty: give a NATS URL or "
        + ("unset it" if named == "GDC_NATS_URL" else "leave the option out")
    ]


def test_run_help_lists_the_exit_codes() -> None:
    """Given `gdc-worker run --help`,
    then its epilog lists the exit codes a deploy script can branch on."""
    result = CliRunner().invoke(main, ["run", "--help"], terminal_width=200)

    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert (
        "Exit codes: 0 ok, 1 a reported error, 2 bad usage, 3 the target cannot be imported or "
        "is not an App, 4 NATS cannot be reached or the connection was lost for good." in text
    )


def test_embedded_port_without_embedded_is_bad_usage() -> None:
    """Given `--embedded-port` without `--embedded`, `gdc-worker run` refuses it (exit 2)."""
    result = CliRunner().invoke(main, ["run", "tests.apps.recorder:app", "--embedded-port", "0"])

    assert result.exit_code == 2, result.output
    assert "--embedded-port goes with --embedded" in result.stderr


@pytest.mark.anyio
async def test_embedded_starts_a_server_with_its_store_in_the_working_directory(
    spawn: Spawn, tmp_path: Path
) -> None:
    """Given no NATS server and an empty working directory,
    when a worker runs with --embedded (on a free --embedded-port; 4222 by default),
    then it serves there with its store in ./.gdc-nats, handles an event published there,
    and SIGTERM stops it with exit 0 and frees the port."""
    out, workdir = tmp_path / "reports", tmp_path / "work"
    workdir.mkdir()
    port = free_port()
    env = clean_env() | {"GDC_TEST_OUT": str(out), "PYTHONPATH": str(ROOT)}
    args = ["--embedded", "--embedded-port", str(port)]
    worker = spawn("run", "tests.apps.recorder:app", *args, env=env, cwd=workdir)
    await worker.ready()
    url = f"nats://127.0.0.1:{port}"
    assert f"embedded nats-server at {url} (store .gdc-nats)" in worker.stderr

    config = NATSConfig(url=url, connect_timeout=5.0)
    event = node_ups(1)[0]
    async with await NATSEventBus.connect(config) as bus:
        await bus.publish_event(event)
    await eventually(lambda: ids(out, "done") == [event.id], "the event handled")

    worker.send(signal.SIGTERM)

    assert await worker.exit_code() == 0, worker.stderr
    assert (workdir / ".gdc-nats" / "jetstream").is_dir()
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_embedded_port_is_4222_by_default() -> None:
    """Given `gdc-worker run --help`, the --embedded server's port defaults to 4222, the
    standard port other processes find without being told."""
    result = CliRunner().invoke(main, ["run", "--help"], terminal_width=200)

    assert re.search(r"--embedded-port .*\[default: 4222;", result.stdout)


# -- signals ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_sigterm_lets_running_handlers_finish_then_exits_0(
    spawn: Spawn, event_bus: NATSEventBus, nats_config: NATSConfig, tmp_path: Path
) -> None:
    """Given a worker whose handler takes 1.5 s, running three events at once,
    when it gets SIGTERM while all three run,
    then all three finish, it exits 0 and its consumer has nothing pending or unacknowledged."""
    out = tmp_path / "reports"
    env = worker_env(nats_config, GDC_TEST_OUT=str(out), GDC_TEST_SLEEP="1.5")
    worker = spawn("run", "tests.apps.recorder:app", "--concurrency", "8", env=env)
    await worker.ready()
    events = node_ups(3)
    await publish(event_bus, events)
    await eventually(lambda: len(ids(out, "start")) == 3, "three handler calls started")

    worker.send(signal.SIGTERM)

    assert await worker.exit_code() == 0, worker.stderr
    assert "stopping: no more fetching; 3 handler call(s) running" in worker.stderr
    assert sorted(ids(out, "done", worker.pid)) == sorted(e.id for e in events)
    info = await settled(nats_config, RECORDER_DURABLE)
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "concurrency",
    [
        pytest.param("3", id="no-idle-capacity"),
        # Idle capacity leaves an open pull request with free slots: events nak'd into it must
        # not come back to the stopping worker.
        pytest.param("32", id="idle-capacity"),
    ],
)
async def test_second_sigterm_cancels_handlers_and_their_events_come_back_at_once(
    spawn: Spawn,
    event_bus: NATSEventBus,
    nats_config: NATSConfig,
    tmp_path: Path,
    concurrency: str,
) -> None:
    """Given a worker with a 60 s grace whose three handler calls would each run 60 s,
    with no idle capacity (concurrency 3) or plenty of it (32),
    when it gets SIGTERM, then SIGTERM again,
    then it exits promptly, by itself, and a worker started afterwards gets the three events
    right away, not after the consumer's 30 s ack wait."""
    out = tmp_path / "reports"
    env = worker_env(nats_config, GDC_TEST_OUT=str(out), GDC_TEST_SLEEP="60")
    args = ["--grace", "60", "--concurrency", concurrency]
    first = spawn("run", "tests.apps.recorder:app", *args, env=env)
    await first.ready()
    events = node_ups(3)
    await publish(event_bus, events)
    await eventually(lambda: len(ids(out, "start")) == 3, "three handler calls started")

    first.send(signal.SIGTERM)
    await first.wait_for(re.compile(r"stopping: no more fetching; 3 handler call\(s\) running"))
    first.send(signal.SIGTERM)

    code = await first.exit_code(timeout=10.0)
    exited = time.monotonic()
    assert code >= 0, f"killed by signal {-code}, not shut down by itself"
    assert ids(out, "done") == []
    env["GDC_TEST_SLEEP"] = "0"
    second = spawn("run", "tests.apps.recorder:app", env=env)
    await eventually(
        lambda: sorted(ids(out, "done", second.pid)) == sorted(e.id for e in events),
        "the three events handled by the second worker",
        timeout=exited + 8.0 - time.monotonic(),
    )


@pytest.mark.anyio
async def test_event_published_while_a_worker_drains_is_handled_by_the_next_worker(
    spawn: Spawn, event_bus: NATSEventBus, nats_config: NATSConfig, tmp_path: Path
) -> None:
    """Given a worker (default concurrency) draining after SIGTERM, one 1.5 s call running,
    when an event is published during the drain, and another worker starts after it exited,
    then the new worker's handler gets that event (it is not dead-lettered unrun for having
    been "delivered" more than max_deliver times to the draining worker)."""
    out = tmp_path / "reports"
    env = worker_env(nats_config, GDC_TEST_OUT=str(out), GDC_TEST_SLEEP="1.5")
    first = spawn("run", "tests.apps.recorder:app", env=env)
    await first.ready()
    [early, late] = node_ups(2)
    await event_bus.publish_event(early)
    await eventually(lambda: ids(out, "start") == [early.id], "the first call started")
    first.send(signal.SIGTERM)
    await first.wait_for(re.compile(r"stopping: no more fetching; 1 handler call\(s\) running"))

    await event_bus.publish_event(late)

    assert await first.exit_code() == 0, first.stderr
    assert ids(out, "done") == [early.id]
    env["GDC_TEST_SLEEP"] = "0"
    second = spawn("run", "tests.apps.recorder:app", env=env)

    def outcome() -> str:
        if late.id in ids(out, "done", second.pid):
            return "handled"
        return "dead-lettered" if f"event {late.id} dead-lettered" in second.stderr else ""

    assert await eventually(outcome, "the late event handled or dead-lettered") == "handled", (
        second.stderr
    )


@pytest.mark.anyio
async def test_kill_9_mid_batch_loses_no_event(
    spawn: Spawn, event_bus: NATSEventBus, nats_config: NATSConfig, tmp_path: Path
) -> None:
    """Given 200 events and a worker (2 s ack wait) whose handler takes 10 ms,
    when the worker is killed with SIGKILL after about 50 of them,
    then a worker started afterwards handles the rest: every event is handled at least once."""
    out = tmp_path / "reports"
    events = node_ups(200)
    await publish(event_bus, events)
    env = worker_env(nats_config, GDC_TEST_OUT=str(out), GDC_TEST_SLEEP="0.01")
    target = "tests.apps.recorder:short_ack_wait"
    first = spawn("run", target, "--concurrency", "2", env=env)
    await eventually(lambda: len(ids(out, "done")) >= 50, "50 events handled", READY_TIMEOUT)

    first.send(signal.SIGKILL)

    assert await first.exit_code() == -signal.SIGKILL
    handled_first = set(ids(out, "done"))
    assert len(handled_first) < len(events), "the first worker finished before the kill"
    second = spawn("run", target, "--concurrency", "8", env=env)
    await eventually(
        lambda: set(ids(out, "done")) >= {e.id for e in events},
        "every event handled",
        timeout=READY_TIMEOUT,
    )
    assert set(ids(out, "done", second.pid)) >= {e.id for e in events} - handled_first
    info = await settled(nats_config, SHORT_ACK_DURABLE)
    assert (info.num_pending, info.num_ack_pending) == (0, 0)


# -- replicas ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_processes_2_share_the_events_and_replace_a_killed_replica(
    spawn: Spawn, event_bus: NATSEventBus, nats_config: NATSConfig, tmp_path: Path
) -> None:
    """Given `gdc-worker run --processes 2`,
    when 100 events are published, a replica is killed with SIGKILL, then the supervisor gets
    SIGTERM,
    then each event is handled exactly once and both replicas handled some, a new replica
    replaces the killed one, and the supervisor exits 0 with every replica stopped."""
    out = tmp_path / "reports"
    env = worker_env(nats_config, GDC_TEST_OUT=str(out), GDC_TEST_SLEEP="0.02")
    supervisor = spawn(
        "run", "tests.apps.recorder:app", "--processes", "2", "--concurrency", "8", env=env
    )
    replicas = await supervisor.ready(2)
    assert len(set(replicas)) == 2
    assert supervisor.pid not in replicas
    events = node_ups(100)

    await publish(event_bus, events)

    await eventually(lambda: len(set(ids(out, "done"))) == 100, "100 events handled")
    info = await settled(nats_config, RECORDER_DURABLE)
    assert (info.num_pending, info.num_ack_pending) == (0, 0)
    done = [r for r in reports(out) if r.phase == "done"]
    assert Counter(r.event_id for r in done) == Counter(e.id for e in events)
    assert {r.pid for r in done} == set(replicas)

    os.kill(replicas[0], signal.SIGKILL)

    [*_, replacement] = await supervisor.ready(3)
    assert replacement not in replicas
    assert not alive(replicas[0])

    supervisor.send(signal.SIGTERM)

    assert await supervisor.exit_code() == 0, supervisor.stderr
    for pid in (replicas[1], replacement):
        assert not alive(pid)


# -- the dead-letter tools --------------------------------------------------------------------

COLUMNS = ["id", "failed_at", "consumer", "event_type", "event_id", "deliveries", "error"]
INSPECT = "nodes-inspect_nodes"
AUDIT = "nodes-audit_downs"


class NodeChecks:
    """App `nodes`: two handlers that dead-letter the events of the nodes they refuse.

    `inspect_nodes` (consumer nodes-inspect_nodes) gets every `node.*` event, `audit_downs`
    (nodes-audit_downs) every `node.down`. Each raises `Reject` for a node in its `refuse` set
    and records `(handler, event id)` of each event it accepts.
    """

    def __init__(self, config: NATSConfig, refuse: dict[str, set[str]]) -> None:
        self.refuse = refuse
        self.accepted: list[tuple[str, str]] = []
        self.app = App("nodes", config=config)
        self.app.on("node.*")(self.inspect_nodes)
        self.app.on("node.down")(self.audit_downs)

    async def inspect_nodes(self, event: Event) -> None:
        self._check("inspect_nodes", event)

    async def audit_downs(self, event: Event) -> None:
        self._check("audit_downs", event)

    def _check(self, handler: str, event: Event) -> None:
        if event.subject in self.refuse.get(handler, ()):
            raise Reject(f"{handler} refuses node {event.subject}")
        self.accepted.append((handler, event.id))

    def accept_all(self) -> None:
        for nodes in self.refuse.values():
            nodes.clear()


@contextlib.contextmanager
def running(app: App) -> Iterator[BlockingPortal]:
    """An in-process `Worker` for `app`, running in a thread until the block ends."""
    worker = Worker(app, grace=1.0)
    with anyio.from_thread.start_blocking_portal("asyncio") as portal:
        work, _ = portal.start_task(worker.run)
        try:
            yield portal
        finally:
            portal.call(worker.stop)
            work.result(timeout=EXIT_TIMEOUT)


def publish_through(portal: BlockingPortal, config: NATSConfig, events: list[Event]) -> None:
    async def go() -> None:
        async with await NATSEventBus.connect(config) as bus:
            await publish(bus, events)

    portal.call(go)


def dlq(config: NATSConfig, *args: str, input: str | None = None, url: str = "") -> Result:
    """`gdc-worker dlq ARGS...` in-process, configured by `GDC_NATS_*` for the test's streams
    (`url` replaces GDC_NATS_URL)."""
    env = worker_env(config)
    if url:
        env["GDC_NATS_URL"] = url
    runner = CliRunner()
    return runner.invoke(main, ["dlq", *args], env=env, input=input, catch_exceptions=False)


def dlq_rows(config: NATSConfig, *args: str) -> list[dict[str, Any]]:
    """`dlq list --json ARGS...`, parsed."""
    result = dlq(config, "list", "--json", *args)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


class DeadLetters:
    """Three dead letters from a `NodeChecks` worker that keeps running in a thread.

    inspect_nodes refuses bad-1 (node.up) and bad-2 (node.down), audit_downs refuses bad-3
    (node.down); good-1 (node.up) is accepted, and so are bad-3 by inspect_nodes and bad-2 by
    audit_downs.
    """

    def __init__(self, config: NATSConfig) -> None:
        self.config = config
        refuse = {"inspect_nodes": {"bad-1", "bad-2"}, "audit_downs": {"bad-3"}}
        self.checks = NodeChecks(config, refuse)
        self.events = {
            "bad-1": new_node_up_event("health-monitor", "bad-1"),
            "good-1": new_node_up_event("health-monitor", "good-1"),
            "bad-2": new_node_down_event("health-monitor", "bad-2", "heartbeat lost"),
            "bad-3": new_node_down_event("health-monitor", "bad-3", "disk failed"),
        }
        self.node_of = {event.id: node for node, event in self.events.items()}

    def cli(self, *args: str, input: str | None = None) -> Result:
        return dlq(self.config, *args, input=input)

    def rows(self, *args: str) -> list[dict[str, Any]]:
        return dlq_rows(self.config, *args)

    def pairs(self, rows: list[dict[str, Any]]) -> set[tuple[str, str]]:
        """(consumer, node) of each row."""
        return {(row["consumer"], self.node_of[row["event_id"]]) for row in rows}

    def entry_id(self, consumer: str, node: str) -> int:
        [entry] = [r["id"] for r in self.rows() if self.pairs([r]) == {(consumer, node)}]
        assert isinstance(entry, int)
        return entry

    def accepted(self, handler: str, node: str) -> bool:
        return (handler, self.events[node].id) in self.checks.accepted


ALL_DEAD = {(INSPECT, "bad-1"), (INSPECT, "bad-2"), (AUDIT, "bad-3")}


@pytest.fixture
def dead_letters(nats_config: NATSConfig) -> Iterator[DeadLetters]:
    """The three dead letters of `DeadLetters`, with the worker still running."""
    scenario = DeadLetters(nats_config)
    with running(scenario.checks.app) as portal:
        publish_through(portal, nats_config, list(scenario.events.values()))
        wait_until(lambda: len(scenario.rows()) == 3, "three dead letters")
        accepted = [
            ("inspect_nodes", "good-1"),
            ("inspect_nodes", "bad-3"),
            ("audit_downs", "bad-2"),
        ]
        wait_until(lambda: all(scenario.accepted(*a) for a in accepted), "the rest accepted")
        yield scenario


def test_dlq_list_shows_a_table_of_the_dead_letters_oldest_first(
    dead_letters: DeadLetters,
) -> None:
    """Given three dead letters of two consumers,
    when `dlq list` runs,
    then it prints a table with a header and one row per dead letter, in id order,
    naming consumer, event type and id, delivery count and the rejection message."""
    result = dead_letters.cli("list")

    assert result.exit_code == 0, result.output
    header, *lines = result.stdout.splitlines()
    assert header.split() == COLUMNS
    rows = [dict(zip(COLUMNS, re.split(r"\s{2,}", line), strict=True)) for line in lines]
    assert len(rows) == 3
    assert [int(row["id"]) for row in rows] == sorted(int(row["id"]) for row in rows)
    now = datetime.now(UTC)
    for row in rows:
        assert now - timedelta(minutes=1) < datetime.fromisoformat(row["failed_at"]) <= now
    node_of = dead_letters.node_of
    got = {
        (r["consumer"], r["event_type"], node_of[r["event_id"]], r["deliveries"], r["error"])
        for r in rows
    }
    assert got == {
        (INSPECT, "node.up", "bad-1", "1", "inspect_nodes refuses node bad-1"),
        (INSPECT, "node.down", "bad-2", "1", "inspect_nodes refuses node bad-2"),
        (AUDIT, "node.down", "bad-3", "1", "audit_downs refuses node bad-3"),
    }


def test_dlq_list_json_prints_one_object_per_line(dead_letters: DeadLetters) -> None:
    """Given three dead letters,
    when `dlq list --json` runs,
    then each line is a JSON object with the table's columns, in id order."""
    rows = dead_letters.rows()

    assert len(rows) == 3
    assert all(set(COLUMNS) <= row.keys() for row in rows)
    assert [row["id"] for row in rows] == sorted(row["id"] for row in rows)
    assert dead_letters.pairs(rows) == ALL_DEAD
    assert {row["deliveries"] for row in rows} == {1}
    assert {(row["event_type"], row["error"]) for row in rows} == {
        ("node.up", "inspect_nodes refuses node bad-1"),
        ("node.down", "inspect_nodes refuses node bad-2"),
        ("node.down", "audit_downs refuses node bad-3"),
    }


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["--type", "node.down"], {(INSPECT, "bad-2"), (AUDIT, "bad-3")}, id="type"),
        pytest.param(["--type", "node.up"], {(INSPECT, "bad-1")}, id="other-type"),
        pytest.param(["--consumer", AUDIT], {(AUDIT, "bad-3")}, id="consumer"),
        pytest.param(
            ["--consumer", INSPECT, "--type", "node.down"], {(INSPECT, "bad-2")}, id="both"
        ),
        pytest.param(["--consumer", AUDIT, "--type", "node.up"], set(), id="none-match"),
    ],
)
def test_dlq_list_filters_by_type_and_consumer(
    dead_letters: DeadLetters, args: list[str], expected: set[tuple[str, str]]
) -> None:
    """Given three dead letters of two consumers and two event types,
    when `dlq list` runs with `--type` and/or `--consumer`,
    then it lists exactly the matching ones."""
    assert dead_letters.pairs(dead_letters.rows(*args)) == expected


def test_dlq_list_limit_gives_the_oldest(dead_letters: DeadLetters) -> None:
    """Given three dead letters,
    when `dlq list --limit 2` runs (and with `--type node.down --limit 1`),
    then it lists the two oldest (the oldest node.down one)."""
    everything = dead_letters.rows()
    downs = [row for row in everything if row["event_type"] == "node.down"]

    assert dead_letters.rows("--limit", "2") == everything[:2]
    assert dead_letters.rows("--type", "node.down", "--limit", "1") == downs[:1]


def test_dlq_list_url_option_overrides_the_environment(dead_letters: DeadLetters) -> None:
    """Given GDC_NATS_URL naming a port where nothing listens,
    when `dlq list --url` names the real server,
    then the option wins and the dead letters are listed."""
    dead = f"nats://127.0.0.1:{free_port()}"

    config = dead_letters.config

    result = dlq(config, "list", "--json", "--url", config.url, url=dead)

    assert result.exit_code == 0, result.output
    assert dead_letters.pairs([json.loads(line) for line in result.stdout.splitlines()]) == (
        ALL_DEAD
    )


def test_dlq_list_without_a_dlq_stream_says_so(nats_config: NATSConfig) -> None:
    """Given a server where no worker ever created the dead-letter stream,
    when `dlq list` runs,
    then it says there are no dead letters and exits 0."""
    result = dlq(nats_config, "list")

    assert (result.exit_code, result.stdout) == (0, "no dead letters\n")


def test_dlq_show_prints_event_error_and_traceback(dead_letters: DeadLetters) -> None:
    """Given the dead letter of bad-1's node.up event,
    when `dlq show ID` runs,
    then it shows the consumer, the deliveries, the error, the event as JSON and the
    traceback of the rejection."""
    entry = dead_letters.entry_id(INSPECT, "bad-1")
    original = dead_letters.events["bad-1"]

    result = dead_letters.cli("show", str(entry))

    assert result.exit_code == 0, result.output
    text = result.stdout
    assert f"id:          {entry}\n" in text
    assert "reason:      rejected: inspect_nodes refuses node bad-1\n" in text
    assert f"consumer:    {INSPECT} (handler inspect_nodes)\n" in text
    assert "deliveries:  1\n" in text
    assert "error:       Reject: inspect_nodes refuses node bad-1\n" in text
    event_json, traceback = text.split("event:\n", 1)[1].split("traceback:\n", 1)
    event = json.loads(event_json)
    assert (event["id"], event["type"], event["subject"]) == (original.id, "node.up", "bad-1")
    assert event["data"] == original.data
    assert traceback.startswith("Traceback (most recent call last):")
    assert "in _check" in traceback
    assert traceback.rstrip().endswith("Reject: inspect_nodes refuses node bad-1")


@pytest.mark.parametrize("gone", ["never-stored", "purged"])
@pytest.mark.parametrize(
    "command", [["show"], ["replay"], ["purge", "--yes"]], ids=["show", "replay", "purge"]
)
def test_dlq_unknown_id_exits_1_with_one_error_line(
    dead_letters: DeadLetters, command: list[str], gone: str
) -> None:
    """Given three dead letters,
    when a dlq command names an id with no dead letter (never stored, or already purged),
    then it exits 1 with one `Error:` line saying there is no dead letter with that id."""
    left = ALL_DEAD
    entry = 999
    if gone == "purged":
        entry = dead_letters.entry_id(AUDIT, "bad-3")
        assert dead_letters.cli("purge", str(entry), "--yes").exit_code == 0
        left = ALL_DEAD - {(AUDIT, "bad-3")}

    result = dead_letters.cli(command[0], str(entry), *command[1:])

    assert result.exit_code == 1, result.output
    stream = dead_letters.config.dlq_stream_name
    said = f"Error: no dead letter with id {entry} in {stream}"
    if command == ["replay"]:
        said = f"Error: dead letter #{entry} not replayed: no such dead letter in {stream}"
    assert result.stderr.splitlines() == [said]
    assert dead_letters.pairs(dead_letters.rows()) == left


def test_dlq_unreachable_server_exits_4_with_one_error_line(nats_config: NATSConfig) -> None:
    """Given GDC_NATS_URL naming a port where nothing listens,
    when `dlq list` runs,
    then it exits 4 (cannot connect) with one `Error:` line naming the URL, no traceback."""
    url = f"nats://127.0.0.1:{free_port()}"

    result = dlq(nats_config, "list", url=url)

    assert result.exit_code == 4, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"Error: cannot connect to NATS at {url}: ")


def test_dlq_replay_redelivers_the_same_event_at_once_and_removes_the_entry(
    dead_letters: DeadLetters,
) -> None:
    """Given the dead letter of bad-1's node.up event, well inside the stream's 5 minute
    duplicate window, and a handler that now accepts bad-1,
    when `dlq replay ID` runs,
    then the handler gets the event with the same id right away, and the entry is gone while
    the other two stay."""
    assert dead_letters.config.duplicate_window >= 60
    entry = dead_letters.entry_id(INSPECT, "bad-1")
    event = dead_letters.events["bad-1"]
    dead_letters.checks.accept_all()

    result = dead_letters.cli("replay", str(entry))

    assert result.exit_code == 0, result.output
    subject = dead_letters.config.subject_for("node.up")
    said, summary = result.stdout.splitlines()
    assert said == f"replayed #{entry}: event {event.id} to {subject}"
    assert re.fullmatch(r"replayed 1, failed 0, in \d+\.\d s, \d+/s", summary)
    wait_until(
        lambda: dead_letters.accepted("inspect_nodes", "bad-1"),
        "the replayed event accepted",
        timeout=5.0,
    )
    assert dead_letters.pairs(dead_letters.rows()) == ALL_DEAD - {(INSPECT, "bad-1")}


def test_dlq_replay_all_of_a_type(dead_letters: DeadLetters) -> None:
    """Given dead letters of node.up and node.down events, and handlers that now accept them,
    when `dlq replay --all --type node.down` runs,
    then both node.down entries are replayed and removed (-v names each, in the order their
    removals finish), and the node.up one stays."""
    downs = [row["id"] for row in dead_letters.rows("--type", "node.down")]
    dead_letters.checks.accept_all()

    result = dead_letters.cli("replay", "--all", "--type", "node.down", "-v")

    assert result.exit_code == 0, result.output
    named = [int(n) for n in re.findall(r"^replayed #(\d+): ", result.stdout, re.M)]
    assert sorted(named) == sorted(downs)
    assert result.stdout.splitlines()[-1].startswith("replayed 2, failed 0, in ")
    assert dead_letters.pairs(dead_letters.rows()) == {(INSPECT, "bad-1")}
    wait_until(
        lambda: (
            dead_letters.accepted("inspect_nodes", "bad-2")
            and dead_letters.accepted("audit_downs", "bad-3")
        ),
        "the replayed events accepted by the handlers that refused them",
        timeout=5.0,
    )


@pytest.mark.parametrize("command", ["replay", "purge"])
@pytest.mark.parametrize(
    ("selection", "said"),
    [
        ([], "give entry IDs or --all"),
        (["1", "--all"], "give entry IDs or --all"),
        (["1", "--type", "node.down"], "--type, --consumer, --since and --error go with --all"),
    ],
    ids=["neither", "both", "ids-with-filter"],
)
def test_dlq_replay_and_purge_need_ids_or_all(
    dead_letters: DeadLetters, command: str, selection: list[str], said: str
) -> None:
    """Given three dead letters,
    when `dlq replay`/`dlq purge` runs with neither IDs nor --all, with both, or with IDs and
    a filter (which would be ignored),
    then it is a usage error (exit 2) that says what to give, and nothing changes."""
    result = dead_letters.cli(command, *selection)

    assert result.exit_code == 2, result.output
    assert said in result.stderr
    assert dead_letters.pairs(dead_letters.rows()) == ALL_DEAD


def test_invalid_setting_in_the_environment_is_one_error_line() -> None:
    """Given GDC_NATS_REPLICAS=x in the environment,
    when any command reads the config,
    then it exits 1 with one line naming the variable, no traceback."""
    result = CliRunner().invoke(main, ["dlq", "list"], env={"GDC_NATS_REPLICAS": "x"})

    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == "Error: GDC_NATS_REPLICAS: 'x' is not a valid replicas"


@pytest.mark.parametrize(
    ("answer", "code", "said", "left"),
    [
        pytest.param("n", 1, "nothing deleted", ALL_DEAD, id="no"),
        pytest.param("y", 0, "purged #{entry}", ALL_DEAD - {(AUDIT, "bad-3")}, id="yes"),
    ],
)
def test_dlq_purge_asks_first(
    dead_letters: DeadLetters, answer: str, code: int, said: str, left: set[tuple[str, str]]
) -> None:
    """Given three dead letters,
    when `dlq purge ID` runs and the user answers the confirmation prompt,
    then "n" deletes nothing and "y" deletes just that entry."""
    entry = dead_letters.entry_id(AUDIT, "bad-3")

    result = dead_letters.cli("purge", str(entry), input=answer + "\n")

    assert result.exit_code == code, result.output
    assert f"Delete 1 dead letter(s) (#{entry}) for good? [y/N]" in result.stdout
    assert said.format(entry=entry) in result.stdout
    assert dead_letters.pairs(dead_letters.rows()) == left


@pytest.mark.parametrize(
    ("filters", "left"),
    [
        pytest.param([], set(), id="everything"),
        pytest.param(["--consumer", INSPECT], {(AUDIT, "bad-3")}, id="one-consumer"),
    ],
)
def test_dlq_purge_all_yes_deletes_without_asking(
    dead_letters: DeadLetters, filters: list[str], left: set[tuple[str, str]]
) -> None:
    """Given three dead letters,
    when `dlq purge --all --yes` runs (with or without a filter),
    then it deletes every matching entry without a prompt."""
    result = dead_letters.cli("purge", "--all", "--yes", *filters)

    assert result.exit_code == 0, result.output
    assert "for good?" not in result.stdout
    assert len(re.findall(r"^purged #\d+$", result.stdout, re.M)) == len(ALL_DEAD - left)
    assert dead_letters.pairs(dead_letters.rows()) == left
    if not left:
        assert dead_letters.cli("list").stdout == "no dead letters\n"


def test_event_refused_by_two_consumers_has_a_dead_letter_for_each(
    nats_config: NATSConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """Given two handlers (two consumers) that both refuse node bad-2,
    when its node.down event is published and both dead-letter it,
    then `dlq list` shows one dead letter of it per consumer."""
    refuse = {"inspect_nodes": {"bad-2"}, "audit_downs": {"bad-2"}}
    event = new_node_down_event("health-monitor", "bad-2", "heartbeat lost")
    with running(NodeChecks(nats_config, refuse).app) as portal:
        publish_through(portal, nats_config, [event])
        wait_until(
            lambda: sum("dead-lettered" in r.getMessage() for r in caplog.records) == 2,
            "both handlers dead-lettered the event",
        )

    rows = dlq_rows(nats_config)

    assert sorted((r["consumer"], r["event_id"]) for r in rows) == [
        (AUDIT, event.id),
        (INSPECT, event.id),
    ]


# -- the development server -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("store", "cause"),
    [
        pytest.param("store", "it is not a directory", id="a-file"),
        pytest.param("store/deeper", "{tmp_path}/store is not a directory", id="under-a-file"),
    ],
)
def test_server_with_an_unusable_store_dir_exits_1_with_one_error_line(
    tmp_path: Path, store: str, cause: str
) -> None:
    """Given `gdc-worker server --store-dir` naming a file, or a path under a file,
    when it starts,
    then it exits 1 with one `Error:` line naming the path and the cause, no traceback."""
    (tmp_path / "store").write_text("a file")
    path = tmp_path / store

    result = run_command(["server", "--port", "0", "--store-dir", str(path)], env=clean_env())

    assert result.returncode == 1, result.stderr
    cause = cause.replace("{tmp_path}", str(tmp_path))
    assert result.stderr.splitlines() == [
        f"Error: cannot use {path} as the JetStream store: {cause}"
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=str)
async def test_server_prints_its_url_serves_jetstream_and_stops_on_signal(
    spawn: Spawn, signum: signal.Signals
) -> None:
    """Given `gdc-worker server --port 0`,
    when it has started, and later gets SIGTERM, SIGINT or SIGHUP (its terminal gone),
    then it printed the URL of a server with JetStream on a free port, then it exits 0 and
    the port no longer accepts connections (no nats-server left behind)."""
    server = spawn("server", "--port", "0", env=clean_env())
    started = re.compile(r"nats-server with JetStream at (nats://127\.0\.0\.1:(\d+)) ")
    match = await eventually(lambda: started.search(server.stdout), "the URL printed")
    assert match is not None
    url, port = match.group(1), int(match.group(2))
    nc = await nats.connect(url)
    try:
        account = await nc.jetstream().account_info()
    finally:
        await nc.close()
    assert account.streams == 0

    server.send(signum)

    assert await server.exit_code() == 0, server.stderr
    assert server.stdout.endswith("nats-server stopped\n")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5.0).close()


NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("30s", NOW - timedelta(seconds=30)),
        ("10m", NOW - timedelta(minutes=10)),
        ("1.5h", NOW - timedelta(minutes=90)),
        ("2d", NOW - timedelta(days=2)),
        ("2024-05-01T10:00:00+02:00", datetime(2024, 5, 1, 8, 0, tzinfo=UTC)),
        ("2024-05-01T10:00:00Z", datetime(2024, 5, 1, 10, 0, tzinfo=UTC)),
        ("2024-05-01", datetime(2024, 5, 1).astimezone(UTC)),
    ],
)
def test_since_takes_an_age_or_an_iso_time(given: str, expected: datetime) -> None:
    """Given a --since value: an age (s, m, h, d) or an ISO time with or without an offset,
    then it means that long before now, or that time (local time without an offset)."""
    assert since_time(given, now=NOW) == expected


@pytest.mark.parametrize("given", ["", "yesterday", "10", "10 m", "-5m", "2024-13-01"])
def test_since_refuses_anything_else_saying_what_it_takes(given: str) -> None:
    """Given a --since value that is neither an age nor an ISO time,
    then it raises a ValueError naming the value and what it takes."""
    with pytest.raises(ValueError, match=rf"--since {re.escape(repr(given))}: give a time ago"):
        since_time(given, now=NOW)


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("99999999999d", "before the earliest time there is"),
        ("3000000d", "before the earliest time there is"),
        ("2024-05-01T12:00:01Z", "in the future"),
        ("2099-01-01", "in the future"),
    ],
)
def test_since_refuses_a_time_before_year_1_or_in_the_future(given: str, why: str) -> None:
    """Given a --since age too large for a date, or a time after now (a time zone mistaken,
    say, which would quietly show nothing but new events),
    then it raises a ValueError naming the value and why (not an OverflowError traceback)."""
    with pytest.raises(ValueError, match=rf"--since {re.escape(repr(given))}: .*{why}"):
        since_time(given, now=NOW)
