"""The publish outbox: publishing while NATS is down, draining in order once it is back,
surviving kill -9, its bounds, the worker and the `gdc-worker outbox` commands.

Each test that takes NATS down has a `nats-server` of its own (`down`), on a fixed port and
store so that it can be started and stopped under the bus.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread
import nats
import pytest
from click.testing import CliRunner, Result
from nats.js import JetStreamContext

from gdc_worker import (
    App,
    ConfigError,
    Context,
    Event,
    Hook,
    NATSConfig,
    NATSEventBus,
    NATSServer,
    OutboxFull,
    PublishError,
    Worker,
    new_node_down_event,
)
from gdc_worker.bus import ConsumerState
from gdc_worker.cli import main
from gdc_worker.events import MSG_ID_HEADER
from gdc_worker.outbox import Outbox
from gdc_worker.testing import isolated_config
from tests.apps.outbox_publisher import event_id
from tests.processes import ROOT, worker_env
from tests.recording import ARRIVAL_TIMEOUT
from tests.support import STOP_TIMEOUT, eventually, free_port, frozen, node_up, wait_until

#: How long a test may take to drain what it queued, or for a process to finish.
DRAIN_TIMEOUT = 60.0


@dataclass
class Down:
    """A nats-server of the test's own, not running until `start()`, and a config with an
    outbox for it."""

    server: NATSServer
    config: NATSConfig

    async def start(self) -> None:
        await anyio.to_thread.run_sync(self.server.start)

    @property
    def outbox_path(self) -> str:
        return self.config.outbox_path


@pytest.fixture
def down(tmp_path: Path) -> Iterator[Down]:
    port = free_port()
    server = NATSServer(port=port, store_dir=tmp_path / "jetstream")
    config = isolated_config(f"nats://127.0.0.1:{port}").replace(
        outbox_path=str(tmp_path / "outbox.db")
    )
    try:
        yield Down(server, config)
    finally:
        server.stop()


@pytest.fixture
async def bus_while_down(down: Down) -> AsyncIterator[NATSEventBus]:
    """A bus with an outbox, connected while its server is down."""
    with anyio.fail_after(ARRIVAL_TIMEOUT):
        bus = await NATSEventBus.connect(down.config)
    async with bus:
        yield bus


async def stored_ids(bus: NATSEventBus) -> list[str]:
    """The `Nats-Msg-Id` of every message in the bus's event stream, in stream order."""
    return [m.headers[MSG_ID_HEADER] async for m in bus.stream_messages(bus.config.stream_name)]


def depth(bus: NATSEventBus) -> int:
    assert bus.outbox is not None
    return bus.outbox.stats().events


# -- publishing while NATS is down --------------------------------------------------------------


@pytest.mark.anyio
async def test_a_bus_connects_while_nats_is_down_and_drains_once_it_is_up(
    down: Down, bus_while_down: NATSEventBus
) -> None:
    """Given a bus with an outbox whose server is down, connect() returned;
    when events are published, publish_event returns None (queued) and flush() returns;
    then once the server starts, they are stored in the order published, and the next
    publish_event returns its stream sequence."""
    bus = bus_while_down
    events = [node_up(f"node-{n}") for n in range(5)]

    assert not bus.connected
    assert [await bus.publish_event(e) for e in events[:3]] == [None, None, None]
    for event in events[3:]:
        await bus.publish_event_async(event)
    await bus.flush()
    assert depth(bus) == 5
    await down.start()
    with anyio.fail_after(DRAIN_TIMEOUT):
        await bus.wait_connected()
        await bus.wait_outbox_empty()

    assert await stored_ids(bus) == [e.id for e in events]
    assert await bus.publish_event(node_up("after")) == 6
    assert depth(bus) == 0


@pytest.mark.anyio
async def test_an_event_jetstream_refuses_for_good_is_set_aside_and_the_rest_go_on(
    down: Down, bus_while_down: NATSEventBus, caplog: pytest.LogCaptureFixture
) -> None:
    """Given an outbox holding an event, then one for a subject no stream captures, then
    another event,
    when the server starts,
    then both events are stored in order, the refused one is set aside (counted as refused,
    logged as an ERROR naming it) instead of blocking the outbox, and the outbox is empty."""
    bus = bus_while_down
    first, last = node_up("first"), node_up("last")
    assert await bus.publish_event(first) is None
    assert bus.outbox is not None
    await bus.outbox.add("nowhere.node.up", b"{}", {"Nats-Msg-Id": "stray"}, "event stray")
    assert await bus.publish_event(last) is None
    await down.start()
    with anyio.fail_after(DRAIN_TIMEOUT):
        await bus.wait_outbox_empty()

    assert await stored_ids(bus) == [first.id, last.id]
    assert bus.outbox.stats().refused == 1
    assert depth(bus) == 0
    assert any(
        r.levelname == "ERROR" and "event stray" in r.getMessage() and "set aside" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.anyio
async def test_events_queued_for_a_server_that_lost_the_stream_are_stored_not_set_aside(
    down: Down, tmp_path: Path
) -> None:
    """Given a bus with an outbox, connected, whose server then stops, and events queued;
    when a server with an empty store (the stream is gone) comes up in its place,
    then the relay sets the stream up again, as connecting does, and stores every event in
    order: a missing stream says nothing about the events, so none is set aside."""
    events = [node_up(f"node-{n}") for n in range(5)]
    fresh = NATSServer(port=down.server.requested_port, store_dir=tmp_path / "fresh")
    await down.start()
    try:
        async with await NATSEventBus.connect(down.config) as bus:
            await anyio.to_thread.run_sync(down.server.stop)
            assert [await bus.publish_event(e) for e in events] == [None] * 5
            await anyio.to_thread.run_sync(fresh.start)
            with anyio.fail_after(DRAIN_TIMEOUT):
                await bus.wait_outbox_empty()

            assert await stored_ids(bus) == [e.id for e in events]
            assert bus.outbox is not None
            assert bus.outbox.stats().refused == 0
    finally:
        fresh.stop()


@pytest.mark.anyio
async def test_a_publish_finding_the_stream_deleted_is_queued_until_it_is_set_up_again(
    nats_config: NATSConfig, jetstream: JetStreamContext, tmp_path: Path
) -> None:
    """Given a bus with an outbox, connected, and its stream deleted behind its back,
    when an event is published, then it is queued (None) rather than refused, and the relay
    sets the stream up again and stores it there."""
    config = nats_config.replace(outbox_path=str(tmp_path / "outbox.db"))
    event = node_up()
    async with await NATSEventBus.connect(config) as bus:
        await jetstream.delete_stream(config.stream_name)

        assert await bus.publish_event(event) is None
        with anyio.fail_after(DRAIN_TIMEOUT):
            await bus.wait_outbox_empty()
        assert await stored_ids(bus) == [event.id]


@pytest.mark.anyio
async def test_async_publishes_finding_the_stream_deleted_are_queued_until_it_is_set_up_again(
    nats_config: NATSConfig, jetstream: JetStreamContext, tmp_path: Path
) -> None:
    """Given a bus with an outbox, connected, and its stream deleted behind its back,
    when events are sent with publish_event_async and send_event (ctx.publish's way), all at
    once, then flush() reports none failed and the pending publish is not a failure: they
    are queued as publish_event's are, and the relay sets the stream up again and stores
    each of them once."""
    config = nats_config.replace(outbox_path=str(tmp_path / "outbox.db"))
    events = [node_up(f"node-{n}") for n in range(50)]
    async with await NATSEventBus.connect(config) as bus:
        await jetstream.delete_stream(config.stream_name)

        for event in events[:-1]:
            await bus.publish_event_async(event)
        pending = await bus.send_event(events[-1])
        with anyio.fail_after(DRAIN_TIMEOUT):
            await bus.flush()
            await pending
            await bus.wait_outbox_empty()
        stored = await stored_ids(bus)

    assert sorted(stored) == sorted(e.id for e in events)


async def limit_message_size(jetstream: JetStreamContext, stream: str, max_msg_size: int) -> None:
    """Set the stream's max_msg_size behind gdc-worker's back, as an operator would."""
    config = (await jetstream.stream_info(stream)).config
    config.max_msg_size = max_msg_size
    await jetstream.update_stream(config)


@pytest.mark.anyio
async def test_an_async_publish_jetstream_refuses_for_good_fails_with_an_outbox_too(
    nats_config: NATSConfig, jetstream: JetStreamContext, tmp_path: Path
) -> None:
    """Given a bus with an outbox, connected, and a stream whose max_msg_size is 1 KiB,
    when an event larger than that is sent with publish_event_async, and one with send_event,
    then flush() and the pending publish raise PublishError naming them, and neither is
    queued: waiting would not get them stored."""
    config = nats_config.replace(outbox_path=str(tmp_path / "outbox.db"))
    big = [new_node_down_event("monitor", f"node-{n}", "x" * 2000) for n in range(2)]
    async with await NATSEventBus.connect(config) as bus:
        await limit_message_size(jetstream, config.stream_name, 1024)

        await bus.publish_event_async(big[0])
        pending = await bus.send_event(big[1])
        with anyio.fail_after(DRAIN_TIMEOUT), pytest.raises(PublishError) as failed:
            await bus.flush()
        with anyio.fail_after(DRAIN_TIMEOUT), pytest.raises(PublishError) as refused:
            await pending
        assert bus.outbox is not None
        stats = bus.outbox.stats()

    assert (stats.events, stats.refused) == (0, 0)
    assert f"event {big[0].id}" in str(failed.value)
    assert "maximum" in str(failed.value)
    assert f"event {big[1].id}" in str(refused.value)


@pytest.mark.anyio
async def test_events_published_while_the_outbox_drains_queue_behind_it(
    down: Down, bus_while_down: NATSEventBus
) -> None:
    """Given 1,000 events queued while NATS was down,
    when the server starts and more events are published while the outbox drains,
    then the new ones are queued behind the old (publish_event returns None), and the stream
    has every event once, in the order published."""
    bus = bus_while_down
    early = [node_up(f"early-{n}") for n in range(1000)]
    late = [node_up(f"late-{n}") for n in range(50)]
    for event in early:
        await bus.publish_event(event)
    await down.start()
    with anyio.fail_after(DRAIN_TIMEOUT):
        await bus.wait_connected()
        returned = [await bus.publish_event(e) for e in late]
        await bus.wait_outbox_empty()

    assert returned[0] is None
    assert await stored_ids(bus) == [e.id for e in early + late]


@pytest.mark.anyio
async def test_with_nats_up_an_outbox_stays_empty(nats_config: NATSConfig, tmp_path: Path) -> None:
    """Given a bus with an outbox and a running server,
    when events are published, one at a time and async,
    then publish_event returns their sequences, and nothing goes to the outbox."""
    config = nats_config.replace(outbox_path=str(tmp_path / "outbox.db"))
    async with await NATSEventBus.connect(config) as bus:
        seqs = [await bus.publish_event(node_up(f"node-{n}")) for n in range(3)]
        for n in range(3):
            await bus.publish_event_async(node_up(f"async-{n}"))
        await bus.flush()

        assert seqs == [1, 2, 3]
        assert depth(bus) == 0
        assert len(await stored_ids(bus)) == 6


@pytest.mark.anyio
async def test_publishes_that_get_no_ack_go_to_the_outbox_and_are_stored_once(
    down: Down,
) -> None:
    """Given a bus with an outbox on a server that stops answering (SIGSTOP) while connected,
    when events are published async and flush() gets no ack, and one more with publish_event,
    then flush() returns and publish_event returns None: all are queued, none claimed stored;
    once the server answers again, each is in the stream once (the late acks and the relay's
    resends have the same Nats-Msg-Id)."""
    await down.start()
    events = [node_up(f"node-{n}") for n in range(20)]
    async with await NATSEventBus.connect(down.config) as bus:
        async with frozen(down.server):
            for event in events[:-1]:
                await bus.publish_event_async(event)
            await bus.flush(timeout=0.5)
            assert await bus.publish_event(events[-1]) is None
            assert depth(bus) == len(events)
        with anyio.fail_after(DRAIN_TIMEOUT):
            await bus.wait_outbox_empty()

        assert await stored_ids(bus) == [e.id for e in events]


@pytest.mark.anyio
async def test_a_full_outbox_raises_outbox_full(down: Down) -> None:
    """Given an outbox bounded to 3 events, NATS down,
    when one more event is published (one at a time or async),
    then OutboxFull (a PublishError) names the outbox, the bound it reached and the ways out
    (NATS back or `gdc-worker outbox flush`, or a higher bound); the queued ones stay."""
    config = down.config.replace(outbox_max_events=3)
    async with await NATSEventBus.connect(config) as bus:
        for n in range(3):
            await bus.publish_event(node_up(f"node-{n}"))
        with pytest.raises(OutboxFull) as full:
            await bus.publish_event(node_up("one too many"))
        with pytest.raises(PublishError, match="is full"):
            await bus.publish_event_async(node_up("one too many"))
        assert depth(bus) == 3

    message = str(full.value)
    assert f"the outbox at {down.outbox_path} is full: 3 events" in message
    assert "outbox_max_events=3 (GDC_NATS_OUTBOX_MAX_EVENTS)" in message
    assert f"gdc-worker outbox flush --path {down.outbox_path}" in message


@pytest.mark.anyio
async def test_an_event_larger_than_the_outbox_bound_is_refused_as_such(down: Down) -> None:
    """Given an empty outbox bounded to fewer bytes than one event, NATS down,
    when the event is published, then OutboxFull says the event alone is over
    outbox_max_bytes (waiting would not help), not that the outbox is full."""
    tiny = down.config.replace(outbox_max_bytes=100)
    async with await NATSEventBus.connect(tiny) as bus:
        with pytest.raises(OutboxFull) as refused:
            await bus.publish_event(node_up())
        assert depth(bus) == 0

    message = str(refused.value)
    assert "is full" not in message
    assert "bytes, over outbox_max_bytes=100 (GDC_NATS_OUTBOX_MAX_BYTES)" in message


def test_a_publisher_killed_half_way_loses_and_duplicates_nothing(
    down: Down, tmp_path: Path
) -> None:
    """Given a publisher of 1,000 events (the issue's test) whose NATS server is stopped,
    when it is killed -9 half-way, the server restarted, and then the publisher (which sends
    all 1,000 again, with the same ids),
    then the stream holds the 1,000 events exactly once each, in order."""
    out = tmp_path / "published"
    env = worker_env(
        down.config,
        GDC_NATS_OUTBOX_PATH=down.outbox_path,
        GDC_NATS_RECONNECT_WAIT="0.2",
        GDC_NATS_MAX_BYTES="0",
        GDC_TEST_OUT=str(out),
        GDC_TEST_COUNT="1000",
        GDC_TEST_PAUSE="0.002",
    )
    command = [sys.executable, "-m", "tests.apps.outbox_publisher"]

    def published() -> int:
        return len(out.read_text().splitlines()) if out.exists() else 0

    first = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: published() >= 500, "half the events published", DRAIN_TIMEOUT)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(STOP_TIMEOUT)
        assert first.stderr is not None
        first.stderr.close()
    assert 500 <= published() < 1000
    down.server.start()
    second = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=DRAIN_TIMEOUT
    )
    assert second.returncode == 0, second.stderr

    async def stored() -> list[str]:
        async with await NATSEventBus.connect(down.config.replace(outbox_path="")) as bus:
            return await stored_ids(bus)

    assert anyio.run(stored) == [event_id(n) for n in range(1000)]


# -- the worker ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_worker_started_while_nats_is_down_binds_once_it_is_up(down: Down) -> None:
    """Given a worker with an outbox started while NATS is down,
    when the server starts and an event arrives,
    then its handler runs, and what the handler published with ctx.publish is stored."""
    app = App("outbox-app", down.config)
    handled: list[str] = []

    @app.on("node.up")
    async def plan(event: Event, ctx: Context) -> None:
        await ctx.publish(new_node_down_event("inspector", event.subject, "checked"))
        handled.append(event.id)

    worker = Worker(app, config=down.config, grace=1.0)
    event = node_up()
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await down.start()
        async with await NATSEventBus.connect(down.config.replace(outbox_path="")) as bus:
            await bus.publish_event(event)
            await eventually(lambda: handled, "the event handled", DRAIN_TIMEOUT)
            stored = [m.subject async for m in bus.stream_messages(down.config.stream_name)]
        worker.stop()

    assert handled == [event.id]
    assert stored == [down.config.subject_for("node.up"), down.config.subject_for("node.down")]


@pytest.mark.anyio
async def test_a_worker_waiting_for_nats_stops_when_asked(down: Down) -> None:
    """Given a worker with an outbox started while NATS is down, waiting to bind,
    when it is stopped (SIGTERM's path),
    then run() returns without NATS ever coming back, and /readyz said it was waiting."""
    app = App("outbox-app", down.config)

    @app.on("node.up")
    async def plan(event: Event) -> None:
        pass

    worker = Worker(app, config=down.config, grace=1.0)
    with anyio.fail_after(DRAIN_TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            waiting = await eventually(
                lambda: (worker.not_ready() or "").startswith("waiting for NATS") and "yes",
                "the worker waiting for NATS",
            )
            worker.stop()
    assert waiting == "yes"
    assert worker.not_ready() == "stopping"


class Connection(Hook):
    """Notes whether the worker's bus is connected, as the hooks hear it."""

    def __init__(self) -> None:
        self.connected = True

    def connection_changed(self, connected: bool) -> None:
        self.connected = connected


@pytest.mark.anyio
async def test_an_event_is_acked_once_its_outputs_are_in_the_outbox_while_nats_is_down(
    down: Down,
) -> None:
    """Given a worker with an outbox whose handler is held on a node.up until NATS is down,
    when the handler then publishes a node.down with ctx.publish,
    then the publish is queued (its sequence None) and the handler's call succeeds; once the
    server is back the node.down is stored once and the node.up is acked, never redelivered."""
    connection = Connection()
    app = App("outbox-app", down.config, hooks=[connection])
    held, go = anyio.Event(), anyio.Event()
    outcomes: list[int | None] = []
    calls: list[int] = []

    @app.on("node.up")
    async def plan(event: Event, ctx: Context) -> None:
        calls.append(ctx.deliveries)
        held.set()
        await go.wait()
        outcomes.append(await (await ctx.publish(new_node_down_event("x", event.subject, "y"))))

    await down.start()
    worker = Worker(app, config=down.config, grace=1.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        async with await NATSEventBus.connect(down.config.replace(outbox_path="")) as bus:
            await bus.publish_event(node_up())
        with anyio.fail_after(DRAIN_TIMEOUT):
            await held.wait()
        await anyio.to_thread.run_sync(down.server.stop)
        await eventually(lambda: not connection.connected, "the worker's bus disconnected")
        go.set()
        await eventually(lambda: outcomes, "the handler's publish queued", DRAIN_TIMEOUT)
        await down.start()
        async with await NATSEventBus.connect(down.config.replace(outbox_path="")) as bus:
            down_subject = down.config.subject_for("node.down")
            await eventually(
                lambda: bus.count_messages(down.config.stream_name, down_subject),
                "the node.down relayed",
                DRAIN_TIMEOUT,
            )
            info = await eventually(
                lambda: _settled(bus, "outbox-app-plan"), "the node.up acked", DRAIN_TIMEOUT
            )
            stored = await bus.count_messages(down.config.stream_name, down_subject)
        worker.stop()

    assert outcomes == [None]
    assert calls == [1]
    assert stored == 1
    assert info.redelivered == 0


async def _settled(bus: NATSEventBus, durable: str) -> ConsumerState | None:
    state = await bus.consumer_state(durable)
    return state if state is not None and (state.pending, state.ack_pending) == (0, 0) else None


# -- the commands -------------------------------------------------------------------------------


def test_outbox_status_and_flush_report_and_drain_it(down: Down) -> None:
    """Given an outbox holding 3 events queued while NATS was down,
    when `gdc-worker outbox status` runs, it shows 3 events and the oldest's age;
    when `gdc-worker outbox flush` runs with the server up, it publishes them in order and
    exits 0, and status then shows 0 events."""
    events = [node_up(f"node-{n}") for n in range(3)]

    async def queue() -> None:
        async with await NATSEventBus.connect(down.config) as bus:
            for event in events:
                await bus.publish_event(event)

    anyio.run(queue)
    env = worker_env(down.config)
    path = ["--path", down.outbox_path]
    runner = CliRunner()

    status = runner.invoke(main, ["outbox", "status", *path], env=env, catch_exceptions=False)
    assert status.exit_code == 0, status.output
    assert "events   3" in status.stdout
    assert "s ago" in status.stdout
    assert "refused  0" in status.stdout
    down.server.start()
    flush = runner.invoke(main, ["outbox", "flush", *path], env=env, catch_exceptions=False)
    assert flush.exit_code == 0, flush.output
    assert "3 event(s) published, 0 left" in flush.stdout
    status = runner.invoke(main, ["outbox", "status", "--json", *path], env=env)
    assert '"events": 0' in status.stdout

    async def stored() -> list[str]:
        async with await NATSEventBus.connect(down.config.replace(outbox_path="")) as bus:
            return await stored_ids(bus)

    assert anyio.run(stored) == [e.id for e in events]


def queued(path: str, *events: tuple[str, bytes, str]) -> None:
    """Queue events (subject, payload, Nats-Msg-Id) in the outbox file at `path`."""

    async def add() -> None:
        async with await Outbox.open(path) as outbox:
            for subject, payload, msg_id in events:
                await outbox.add(subject, payload, {MSG_ID_HEADER: msg_id}, f"event {msg_id}")

    anyio.run(add)


def stream_ids(config: NATSConfig) -> list[str]:
    """The `Nats-Msg-Id` of every message in `config`'s event stream, in stream order."""

    async def read() -> list[str]:
        async with await NATSEventBus.connect(config, setup_stream=False) as bus:
            return await stored_ids(bus)

    return anyio.run(read)


def test_outbox_flush_sets_aside_an_event_jetstream_refuses_and_publishes_the_rest(
    nats_config: NATSConfig, tmp_path: Path
) -> None:
    """Given an outbox whose oldest event is for a subject no stream captures, then two events,
    when `gdc-worker outbox flush` runs, then it sets the refused one aside in the refused
    table, saying so in one line on stderr naming it and why, publishes the two in order, and
    exits 1; `outbox status` then shows no event left and one refused."""
    path = str(tmp_path / "outbox.db")
    subject = nats_config.subject_for("node.up")
    queued(path, ("nowhere.node.up", b"{}", "stray"), (subject, b"{}", "a"), (subject, b"{}", "b"))
    env = worker_env(nats_config)
    runner = CliRunner()

    flush = runner.invoke(main, ["outbox", "flush", "--path", path], env=env)
    status = runner.invoke(main, ["outbox", "status", "--json", "--path", path], env=env)

    assert flush.exit_code == 1, flush.output
    assert "2 event(s) published, 0 left, 1 set aside" in flush.stdout
    refusal = [line for line in flush.stderr.splitlines() if "set aside" in line]
    assert len(refusal) == 1
    assert "queued event stray to nowhere.node.up" in refusal[0]
    assert "no stream captures the subject" in refusal[0]
    assert '"events": 0' in status.stdout
    assert '"refused": 1' in status.stdout
    assert stream_ids(nats_config) == ["a", "b"]


def stream_with_max_msg_size(config: NATSConfig, max_msg_size: int) -> None:
    """Set `config`'s event stream up, or keep it, with this max_msg_size, as an operator
    would change it: behind gdc-worker's back."""

    async def limit() -> None:
        await (await NATSEventBus.connect(config)).close()
        nc = await nats.connect(config.url)
        try:
            await limit_message_size(nc.jetstream(), config.stream_name, max_msg_size)
        finally:
            await nc.close()

    anyio.run(limit)


def test_an_operator_lists_refused_events_and_requeues_them_once_the_cause_is_fixed(
    nats_config: NATSConfig, tmp_path: Path
) -> None:
    """Given a stream whose max_msg_size is 1 KiB, and an outbox holding an event of 2 KB
    then a small one, which `outbox flush` published but for the large one, set aside;
    when `gdc-worker outbox refused` runs, it lists the large one: its id, Nats-Msg-Id,
    subject, when it was queued and refused, and why (`--json`: one object per line);
    when `outbox requeue` names an id that is not refused, it exits 1 in one line, and moves
    nothing, not even the ids that are;
    when the operator raises the limit and runs `outbox requeue --all`, then `outbox flush`,
    the event is stored with its original Nats-Msg-Id, and nothing is left refused."""
    path = str(tmp_path / "outbox.db")
    subject = nats_config.subject_for("node.up")
    stream_with_max_msg_size(nats_config, 1024)
    queued(path, (subject, b"x" * 2000, "big"), (subject, b"{}", "small"))
    env = worker_env(nats_config)
    runner = CliRunner()

    def outbox(*args: str) -> Result:
        return runner.invoke(main, ["outbox", *args, "--path", path], env=env)

    assert outbox("flush").exit_code == 1
    table = outbox("refused")
    listed = outbox("refused", "--json")
    unknown = outbox("requeue", "1", "7")
    still = outbox("refused", "--json")
    stream_with_max_msg_size(nats_config, 4096)
    requeued = outbox("requeue", "--all")
    flush = outbox("flush")

    assert table.exit_code == 0, table.output
    header, row = table.stdout.splitlines()
    assert header.split() == ["id", "event", "subject", "queued", "refused", "reason"]
    assert row.split()[:3] == ["1", "big", subject]
    assert "message size exceeds maximum allowed" in row
    [refused] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert refused["id"] == 1
    assert (refused["event"], refused["subject"]) == ("big", subject)
    assert refused["queued_at"] <= refused["refused_at"]
    assert "exceeds maximum" in refused["reason"]
    assert (unknown.exit_code, unknown.output) == (
        1,
        f"Error: no refused event 7 in the outbox {path}: `gdc-worker outbox refused` lists them\n",
    )
    assert still.stdout == listed.stdout
    assert requeued.exit_code == 0, requeued.output
    assert f"outbox {path}: 1 event(s) requeued" in requeued.stdout
    assert flush.exit_code == 0, flush.output
    assert outbox("refused", "--json").stdout == ""
    assert stream_ids(nats_config) == ["small", "big"]


def test_outbox_requeue_takes_ids_or_all(tmp_path: Path) -> None:
    """Given an outbox, when `outbox requeue` is given neither IDs nor --all, or both, it
    exits 2 saying what it takes."""
    path = str(tmp_path / "outbox.db")
    queued(path)
    runner = CliRunner()

    neither = runner.invoke(main, ["outbox", "requeue", "--path", path])
    both = runner.invoke(main, ["outbox", "requeue", "--all", "1", "--path", path])

    for result in (neither, both):
        assert result.exit_code == 2
        assert "give refused event IDs or --all, not both and not neither" in result.output


def test_outbox_commands_refuse_a_missing_outbox_in_one_line(tmp_path: Path) -> None:
    """Given no outbox configured, a path with no outbox file, a directory, or an empty file
    (`touch`ed), when `gdc-worker outbox status` runs, it exits 2 with one line naming the
    problem, and creates or changes no file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GDC_NATS_")}
    runner = CliRunner()
    missing = tmp_path / "nothing.db"
    empty = tmp_path / "empty.db"
    empty.touch()

    unset = runner.invoke(main, ["outbox", "status"], env=env)
    absent = runner.invoke(main, ["outbox", "flush", "--path", str(missing)], env=env)
    directory = runner.invoke(main, ["outbox", "status", "--path", str(tmp_path)], env=env)
    blank = runner.invoke(main, ["outbox", "status", "--path", str(empty)], env=env)

    assert (unset.exit_code, unset.output) == (
        2,
        "Error: no outbox: give --path or set GDC_NATS_OUTBOX_PATH\n",
    )
    assert (absent.exit_code, absent.output) == (2, f"Error: no outbox at {missing}\n")
    assert (directory.exit_code, directory.output) == (
        2,
        f"Error: {tmp_path} is a directory: give the outbox file in it\n",
    )
    assert (blank.exit_code, blank.output) == (
        2,
        f"Error: no outbox at {empty}: the file is empty\n",
    )
    assert not missing.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db"]
    assert empty.stat().st_size == 0


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"outbox_max_events": 0}, "outbox_max_events: must be at least 1, got 0"),
        ({"outbox_max_bytes": -1}, "outbox_max_bytes: must be at least 1, got -1"),
        ({"outbox_max_events": 1.5}, "outbox_max_events: must be an integer, got 1.5"),
        ({"outbox_path": 3}, "outbox_path: must be a string, got 3"),
    ],
)
def test_bad_outbox_settings_are_refused_naming_the_field(
    changes: dict[str, object], message: str
) -> None:
    """Given an outbox setting out of range or of the wrong type, NATSConfig refuses it."""
    with pytest.raises(ConfigError) as caught:
        NATSConfig(**changes)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_outbox_settings_come_from_the_environment() -> None:
    """Given GDC_NATS_OUTBOX_* variables, from_env reads them; a bad one names the variable."""
    env = {"GDC_NATS_OUTBOX_PATH": "/var/lib/svc/outbox.db", "GDC_NATS_OUTBOX_MAX_EVENTS": "5"}

    config = NATSConfig.from_env(env)

    assert (config.outbox_path, config.outbox_max_events) == ("/var/lib/svc/outbox.db", 5)
    assert config.outbox_max_bytes == 256 * 1024**2
    with pytest.raises(ConfigError, match="GDC_NATS_OUTBOX_MAX_BYTES: 'lots' is not a valid"):
        NATSConfig.from_env({"GDC_NATS_OUTBOX_MAX_BYTES": "lots"})


@pytest.mark.anyio
async def test_an_unusable_outbox_path_fails_connect_naming_it(tmp_path: Path) -> None:
    """Given outbox_path in a missing directory, a file that is not an outbox, or a
    directory, when the bus connects, ConfigError names outbox_path and the path, and why,
    before any connect."""
    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a database" * 100)
    for path, cause in [
        (tmp_path / "missing" / "outbox.db", "unable to open database file"),
        (garbage, "file is not a database"),
        (tmp_path, "it is a directory"),
    ]:
        config = NATSConfig(url=f"nats://127.0.0.1:{free_port()}", outbox_path=str(path))
        with pytest.raises(ConfigError, match=f"outbox_path: cannot use {path} .*{cause}"):
            await NATSEventBus.connect(config)


@pytest.mark.anyio
async def test_a_sqlite_database_of_something_else_is_refused_and_left_as_it_was(
    tmp_path: Path,
) -> None:
    """Given outbox_path naming an application's own SQLite database (by mistake),
    when an outbox opens it, ConfigError says it is not an outbox, and the database is as it
    was: no table of the outbox's added, its journal mode kept."""
    path = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    with pytest.raises(ConfigError, match=f"{path} is a SQLite database of something else"):
        await Outbox.open(path)

    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == [("users",)]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """`path` made read-only, for root too (which file modes do not stop): immutable."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        yield
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a file read-only for root here (chattr +i)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.anyio
async def test_an_outbox_file_it_cannot_write_is_refused_at_open(tmp_path: Path) -> None:
    """Given an outbox file that is read-only to the service,
    when an outbox opens it, ConfigError names the file at once, rather than every publish
    failing later, while NATS is down and the outbox is what the service relies on."""
    path = tmp_path / "outbox.db"
    await (await Outbox.open(path)).close()
    with read_only(path), pytest.raises(ConfigError, match=f"cannot use {path} .*readonly"):
        await Outbox.open(path)


@pytest.mark.anyio
async def test_the_outbox_keeps_events_across_a_restart(tmp_path: Path) -> None:
    """Given events added to an outbox file that is then closed,
    when it is opened again, they are there, oldest first, with their headers."""
    path = tmp_path / "outbox.db"
    async with await Outbox.open(path) as outbox:
        for n in range(3):
            await outbox.add("a.b", f"{n}".encode(), {MSG_ID_HEADER: f"id-{n}"}, f"event {n}")

    async with await Outbox.open(path) as outbox:
        rows = await outbox.head(10)
        assert outbox.stats().events == 3

    assert [(r.payload, r.headers) for r in rows] == [
        (f"{n}".encode(), {MSG_ID_HEADER: f"id-{n}"}) for n in range(3)
    ]
