"""The dead-letter stream on a real server: records of any size, a stream deleted under running
workers, messages in it that are not records, and the `dlq` commands on all of them.

Dead letters come from a real `Worker` whose handler rejects the events it is told to, or from
`DeadLetterQueue.record` given a message stored in the event stream. The `dlq` commands run
in-process through click's `CliRunner`, in a thread beside the test's event loop.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import pty
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import msgspec
import nats
import pytest
from click.testing import CliRunner, Result
from nats.js import JetStreamContext

from gdc_worker import (
    App,
    DeadLetterEntry,
    DeadLetterQueue,
    DeadLetterRecord,
    Event,
    NATSConfig,
    NATSEventBus,
    Reject,
    Worker,
    new_node_down_event,
    new_node_up_event,
)
from gdc_worker.cli import main
from gdc_worker.events import event_headers
from gdc_worker.testing import isolated_env
from tests.processes import Process, worker_env
from tests.recording import Recording
from tests.support import eventually

pytestmark = pytest.mark.anyio

T = TypeVar("T")

BLOB = "blob.stored"
#: The consumer of `Refuser`'s handler.
DURABLE = "blobs-check"
#: NATS/1.0 CRLF, `Nats-Msg-Id: <uuid>` CRLF, CRLF: the headers of an event `publish_event` sends.
EVENT_HEADERS_SIZE = 10 + len("Nats-Msg-Id: ") + 36 + 2 + 2


# -- helpers ----------------------------------------------------------------------------------


def blob_event(size: int) -> Event:
    """A `blob.stored` event whose JSON is exactly `size` bytes."""
    empty = Event.new(BLOB, "test", "blob-1", {"blob": ""})
    padding = size - len(empty.to_json())
    assert padding >= 0
    event = msgspec.structs.replace(empty, data={"blob": "x" * padding})
    assert len(event.to_json()) == size
    return event


async def max_payload(config: NATSConfig) -> int:
    """The server's max_payload, as a client learns it."""
    nc = await nats.connect(config.url)
    try:
        return nc.max_payload
    finally:
        await nc.close()


class Refuser:
    """App `blobs` with one handler, `check` (consumer blobs-check), on `blob.stored`.

    It raises `Reject` for the events whose id is in `refused` and records the others.
    """

    def __init__(self, config: NATSConfig, refused: set[str]) -> None:
        self.refused = refused
        self.accepted: Recording[Event] = Recording(lambda event: event)
        self.app = App("blobs", config=config)
        self.app.on(BLOB, backoff=(0.2,))(self.check)

    async def check(self, event: Event) -> None:
        if event.id in self.refused:
            raise Reject(f"blob {event.id} refused")
        self.accepted.note(event)


@asynccontextmanager
async def working(app: App) -> AsyncIterator[None]:
    """A `Worker` for `app` in the test's event loop until the block ends."""
    worker = Worker(app, grace=1.0)
    async with anyio.create_task_group() as tg:
        await tg.start(worker.run)
        try:
            yield
        finally:
            worker.stop()


async def entries(bus: NATSEventBus) -> list[DeadLetterEntry]:
    return [entry async for entry in DeadLetterQueue(bus).entries()]


async def dead_letter_of(bus: NATSEventBus, event: Event) -> DeadLetterEntry:
    """The dead letter of `event`, once there is one."""

    async def found() -> DeadLetterEntry | None:
        for entry in await entries(bus):
            if entry.readable and entry.record.event_id == event.id:
                return entry
        return None

    return await eventually(found, f"a dead letter of {event.id}")


async def dlq(config: NATSConfig, *args: str) -> Result:
    """`gdc-worker dlq ARGS...`, configured by `GDC_NATS_*` for the test's streams."""
    invoke = functools.partial(
        CliRunner().invoke, main, ["dlq", *args], env=isolated_env(config), catch_exceptions=False
    )
    return await anyio.to_thread.run_sync(invoke)


async def rows(config: NATSConfig) -> list[dict[str, Any]]:
    """`dlq list --json`, parsed."""
    result = await dlq(config, "list", "--json")
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


async def stream_data(bus: NATSEventBus, stream: str) -> list[bytes]:
    """The payloads stored in `stream`, in order."""
    return [message.data async for message in bus.stream_messages(stream)]


@dataclass(frozen=True)
class Stored:
    """A message stored in the event stream, as a worker's delivery of it would look."""

    stream: str
    stream_seq: int
    subject: str
    data: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    deliveries: int = 1


async def store(bus: NATSEventBus, data: bytes, headers: Mapping[str, str]) -> Stored:
    """Publish `data` to the event stream and describe it as a delivery."""
    config = bus.config
    subject = config.subject_for(BLOB)
    seq = await bus.publish_raw(subject, data, headers)
    return Stored(config.stream_name, seq, subject, data, dict(headers))


async def record(bus: NATSEventBus, message: Stored, error: BaseException | None = None) -> int:
    return await DeadLetterQueue(bus).record(
        reason="rejected: test",
        consumer=DURABLE,
        handler="check",
        delivery=message,
        error=error if error is not None else Reject("test"),
    )


def one_error_line(result: Result) -> str:
    """The one line a failed command printed on stderr, checked to be an `Error:` line."""
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: ")
    return line


# -- events of any size -----------------------------------------------------------------------


async def test_a_900_kb_event_is_dead_lettered_and_replayed_byte_for_byte(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given a handler that rejects a 900 KB event (about 86% of the server's max_payload),
    when the event is dead-lettered, then replayed with `dlq replay` once the handler takes it,
    then the dead letter holds the event's bytes and `dlq show` shows it, and the handler
    gets the event again with the very same bytes stored in the event stream."""
    event = blob_event(900_000)
    original = event.to_json()
    refuser = Refuser(nats_config, {event.id})
    async with working(refuser.app):
        await event_bus.publish_event(event)
        entry = await dead_letter_of(event_bus, event)

        assert entry.record.data == original
        assert not entry.record.by_reference
        shown = await dlq(nats_config, "show", str(entry.id))
        assert shown.exit_code == 0, shown.output
        assert json.loads(shown.stdout.split("event:\n")[1].split("traceback:\n")[0]) == (
            msgspec.to_builtins(event)
        )

        refuser.refused.clear()
        replayed = await dlq(nats_config, "replay", str(entry.id))

        assert replayed.exit_code == 0, replayed.output
        assert replayed.stdout.splitlines()[0] == (
            f"replayed #{entry.id}: event {event.id} to {entry.record.subject}"
        )
        await refuser.accepted.wait_for_event(event)
    assert await stream_data(event_bus, nats_config.stream_name) == [original, original]
    assert await entries(event_bus) == []


async def test_an_event_near_max_payload_is_dead_lettered_by_reference_and_still_replayed(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given a handler that rejects an event 10 bytes short of the server's max_payload (its
    headers included), too large to store with the dead letter's own header,
    when it is dead-lettered,
    then `dlq list` and `dlq show` still show it, and `dlq replay` republishes the same bytes,
    which the handler gets once it takes the event."""
    limit = await max_payload(nats_config)
    event = blob_event(limit - EVENT_HEADERS_SIZE - 10)
    original = event.to_json()
    refuser = Refuser(nats_config, {event.id})
    async with working(refuser.app):
        await event_bus.publish_event(event)
        entry = await dead_letter_of(event_bus, event)

        assert entry.record.by_reference
        [row] = await rows(nats_config)
        assert (row["id"], row["event_id"], row["event_type"]) == (entry.id, event.id, BLOB)
        assert row["error"] == f"blob {event.id} refused"
        shown = await dlq(nats_config, "show", str(entry.id))
        assert shown.exit_code == 0, shown.output
        assert "stored:      by reference" in shown.stdout
        assert f'"id": "{event.id}"' in shown.stdout

        refuser.refused.clear()
        replayed = await dlq(nats_config, "replay", str(entry.id))

        assert replayed.exit_code == 0, replayed.output
        await refuser.accepted.wait_for_event(event)
    assert await stream_data(event_bus, nats_config.stream_name) == [original, original]
    assert await entries(event_bus) == []


@pytest.mark.parametrize("short_by", [0, 1, 100, 3_000, 6_000, 20_000, 200_000])
async def test_a_message_that_fit_always_gets_a_dead_letter_with_its_bytes_and_headers(
    nats_config: NATSConfig, event_bus: NATSEventBus, short_by: int
) -> None:
    """Given a message in the event stream `short_by` bytes short of max_payload (headers
    included), from exactly at the limit to well below it,
    when it is dead-lettered after an error with a long multi-line message,
    then the dead letter is stored and reads back with the message's bytes and headers."""
    limit = await max_payload(nats_config)
    headers = {"Nats-Msg-Id": f"blob-{short_by}", "Gdc-Trace-Id": "trace-1"}
    header_size = 10 + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 2
    data = b"\xff" + b"z" * (limit - header_size - short_by - 1)  # not an event
    message = await store(event_bus, data, headers)

    entry_id = await record(event_bus, message, RuntimeError("line 1\r\nline 2\n" * 5_000))

    entry = await DeadLetterQueue(event_bus).get(entry_id)
    assert (entry.record.data, entry.record.headers) == (data, headers)
    assert (entry.record.event_type, entry.record.event) == ("invalid", None)
    assert entry.record.error_message.startswith("line 1\r\nline 2\n")


async def test_long_errors_are_kept_bounded_and_say_they_were_cut(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given an error with a 100,000-character message at the end of a chain of 40 errors,
    when the message it failed is dead-lettered,
    then the record keeps the start of the message and the end of the traceback, each saying
    it was cut, and text that is not plain ASCII reads back as it was."""
    text = "é =?utf-8?q?x?= " + "x" * 100_000

    def chain(n: int) -> None:
        try:
            if n:
                chain(n - 1)
            raise KeyError("the root")
        except LookupError as exc:
            raise LookupError(text if n == 40 else f"level {n}") from exc

    try:
        chain(40)
    except LookupError as exc:
        error = exc
    message = await store(event_bus, b"{}", {})

    entry = await DeadLetterQueue(event_bus).get(await record(event_bus, message, error))

    kept = entry.record
    assert kept.error_message.startswith("é =?utf-8?q?x?= xxx")
    assert kept.error_message.endswith(" ... (cut: 100016 characters in all)")
    assert len(kept.error_message) < 1_100
    assert kept.traceback.startswith("(traceback cut: its first ")
    assert 3_000 < len(kept.traceback) < 4_200
    last = kept.traceback.splitlines()[-1]
    assert last.startswith("LookupError: é =?utf-8?q?x?= xxx")
    assert last.endswith(" ... (cut: 100029 characters in all)")


async def test_the_same_failure_recorded_twice_is_stored_once_per_consumer(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given one message in the event stream,
    when one consumer records its failure twice and another consumer once,
    then there are two dead letters, and the repeated record has the first one's id."""
    message = await store(event_bus, blob_event(300).to_json(), {})
    queue = DeadLetterQueue(event_bus)

    first = await record(event_bus, message)
    again = await record(event_bus, message)
    other = await queue.record(
        reason="rejected", consumer="other", handler="h", delivery=message, error=None
    )

    assert again == first
    assert [entry.id for entry in await entries(event_bus)] == [first, other]


# -- a dead-letter stream that is gone or cannot be written -------------------------------------


async def test_a_dlq_stream_deleted_under_a_running_worker_is_recreated_by_the_next_dead_letter(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given a running worker whose dead-letter stream someone deletes,
    when the worker rejects an event,
    then the stream is created again and holds the event's dead letter."""
    event = blob_event(200)
    refuser = Refuser(nats_config, {event.id})
    async with working(refuser.app):
        await jetstream.delete_stream(nats_config.dlq_stream_name)

        await event_bus.publish_event(event)

        entry = await dead_letter_of(event_bus, event)
    assert entry.record.reason == f"rejected: blob {event.id} refused"
    info = await jetstream.stream_info(nats_config.dlq_stream_name)
    assert info.config.subjects == [f"{nats_config.dlq_subject_prefix}.>"]


async def test_an_event_whose_dead_letter_cannot_be_written_comes_back_until_it_can(
    nats_config: NATSConfig,
    event_bus: NATSEventBus,
    jetstream: JetStreamContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Given a running worker whose dead-letter stream was deleted, and another stream that
    takes part of its subjects, so that it cannot be created again,
    when the worker rejects an event,
    then it logs an ERROR naming the dead-letter stream, the event stays and comes back, and
    once the other stream is gone, its dead letter is written."""
    event = blob_event(200)
    refuser = Refuser(nats_config, {event.id})
    prefix, dlq_stream = nats_config.dlq_subject_prefix, nats_config.dlq_stream_name
    squatter = f"{dlq_stream}_SQUATTER"
    async with working(refuser.app):
        await jetstream.delete_stream(dlq_stream)
        await jetstream.add_stream(name=squatter, subjects=[f"{prefix}.squatter.>"])

        await event_bus.publish_event(event)

        async def refused_twice() -> bool:
            lines = [r for r in caplog.records if "cannot dead-letter" in r.getMessage()]
            return len(lines) >= 2 and all(r.levelno == logging.ERROR for r in lines)

        await eventually(refused_twice, "two dead letters that could not be written")
        refusals = [
            r.getMessage() for r in caplog.records if "cannot dead-letter" in r.getMessage()
        ]
        assert all(dlq_stream in line for line in refusals)
        await jetstream.delete_stream(squatter)
        entry = await dead_letter_of(event_bus, event)
    assert entry.record.deliveries >= 3


# -- messages that are not records --------------------------------------------------------------


@dataclass(frozen=True)
class Mixed:
    """Ids in the dead-letter stream: a record, a foreign message on `<prefix>.x.y`, a record,
    a message whose record header is broken, and a record, in that order; and the original
    bytes of the three records."""

    ids: list[int]
    originals: list[bytes]


@pytest.fixture
async def mixed(nats_config: NATSConfig, event_bus: NATSEventBus) -> Mixed:
    """The dead-letter stream of `Mixed`."""
    await DeadLetterQueue(event_bus).ensure()
    prefix = nats_config.dlq_subject_prefix
    messages = [await store(event_bus, blob_event(300 + n).to_json(), {}) for n in range(3)]
    first = await record(event_bus, messages[0])
    foreign = await event_bus.publish_raw(f"{prefix}.x.y", b"\x00\x01garbage", {})
    second = await record(event_bus, messages[1])
    broken = await event_bus.publish_raw(
        f"{prefix}.{DURABLE}.{BLOB}", b"{}", {"Gdc-Dlq-Record": '{"failed_at": 3'}
    )
    third = await record(event_bus, messages[2])
    return Mixed([first, foreign, second, broken, third], [m.data for m in messages])


async def test_dlq_list_shows_messages_that_are_not_records_as_unreadable(
    nats_config: NATSConfig, mixed: Mixed
) -> None:
    """Given a dead-letter stream with records, a foreign message and a broken record header,
    when `dlq list` runs (as a table and with --json),
    then it lists all five in id order, the two that are no records as unreadable, with why."""
    first, foreign, second, broken, third = mixed.ids

    listed = await rows(nats_config)
    table = await dlq(nats_config, "list")

    assert [row["id"] for row in listed] == mixed.ids
    unreadable = {row["id"]: row["unreadable"] for row in listed if row["unreadable"]}
    assert unreadable.keys() == {foreign, broken}
    assert "no Gdc-Dlq-Record header" in unreadable[foreign]
    assert "Gdc-Dlq-Record header does not decode" in unreadable[broken]
    assert table.exit_code == 0, table.output
    lines = {int(line.split()[0]): line.split() for line in table.stdout.splitlines()[1:]}
    assert lines.keys() == set(mixed.ids)
    assert lines[foreign][1:6] == ["-", "-", "unreadable", "-", "-"]
    assert lines[first][3] == lines[second][3] == lines[third][3] == BLOB


async def test_dlq_show_of_a_message_that_is_not_a_record_shows_what_is_there(
    nats_config: NATSConfig, mixed: Mixed
) -> None:
    """Given a foreign message in the dead-letter stream,
    when `dlq show ID` runs,
    then it shows that it is unreadable and why, its subject, its size and its first bytes."""
    foreign = mixed.ids[1]

    result = await dlq(nats_config, "show", str(foreign))

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"id:          {foreign}",
        "unreadable:  not a dead-letter record (no Gdc-Dlq-Record header)",
        f"subject:     {nats_config.dlq_subject_prefix}.x.y",
        "size:        9 bytes",
        "first bytes: b'\\x00\\x01garbage'",
    ]


async def test_dlq_replay_all_replays_the_records_and_names_each_message_it_cannot(
    nats_config: NATSConfig, event_bus: NATSEventBus, mixed: Mixed
) -> None:
    """Given three records and two messages that are not records,
    when `dlq replay --all` runs,
    then it replays and removes the records, says in one error line for each of the others
    why it was not replayed, leaves those, sums it up in one line, and exits 1."""
    _, foreign, _, broken, _ = mixed.ids

    result = await dlq(nats_config, "replay", "--all")

    assert result.exit_code == 1, result.output
    assert re.fullmatch(r"replayed 3, failed 2, in \d+\.\d s, \d+/s\n", result.stdout)
    not_a_record, undecodable = result.stderr.splitlines()
    assert not_a_record == (
        f"Error: dead letter #{foreign} not replayed: not a dead-letter record (no "
        "Gdc-Dlq-Record header)"
    )
    assert undecodable.startswith(
        f"Error: dead letter #{broken} not replayed: its Gdc-Dlq-Record header does not decode: "
    )
    assert [row["id"] for row in await rows(nats_config)] == [foreign, broken]
    replayed = (await stream_data(event_bus, nats_config.stream_name))[3:]
    assert replayed == mixed.originals


async def test_dlq_purge_removes_messages_that_are_not_records_by_id_and_with_all(
    nats_config: NATSConfig, mixed: Mixed
) -> None:
    """Given a dead-letter stream with records and two messages that are not records,
    when `dlq purge ID --yes` names one of them, then `dlq purge --all --yes` runs,
    then the first removes just that message, and the second everything else."""
    foreign = mixed.ids[1]

    by_id = await dlq(nats_config, "purge", str(foreign), "--yes")

    assert (by_id.exit_code, by_id.stdout) == (0, f"purged #{foreign}\n")
    assert [row["id"] for row in await rows(nats_config)] == [n for n in mixed.ids if n != foreign]

    everything = await dlq(nats_config, "purge", "--all", "--yes")

    assert everything.exit_code == 0, everything.output
    assert everything.stdout.splitlines() == [f"purged #{n}" for n in mixed.ids if n != foreign]
    assert (await dlq(nats_config, "list")).stdout == "no dead letters\n"


async def test_a_record_by_reference_whose_original_is_gone_says_so(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given the dead letter of a message too large to copy, whose original was then deleted
    from the event stream,
    when `dlq list`, `dlq show ID` and `dlq replay ID` run,
    then list shows it as before; show prints what the record knows and one error line that
    the message is gone (exit 1); replay says in one error line that it cannot be replayed
    (exit 1) and keeps the dead letter."""
    limit = await max_payload(nats_config)
    event = blob_event(limit - EVENT_HEADERS_SIZE)
    message = await store(event_bus, event.to_json(), {"Nats-Msg-Id": event.id})
    entry_id = await record(event_bus, message)
    await jetstream.delete_msg(nats_config.stream_name, message.stream_seq)
    where = f"{nats_config.stream_name} #{message.stream_seq}"

    [row] = await rows(nats_config)
    shown = await dlq(nats_config, "show", str(entry_id))
    replayed = await dlq(nats_config, "replay", str(entry_id))

    assert (row["id"], row["event_id"], row["unreadable"]) == (entry_id, event.id, "")
    assert shown.exit_code == 1, shown.output
    assert "reason:      rejected: test\n" in shown.stdout
    assert f"{where} is gone" in one_error_line(shown)
    assert replayed.exit_code == 1, replayed.output
    assert one_error_line(replayed) == (
        f"Error: dead letter #{entry_id} not replayed: the message was too large to "
        f"copy, and {where} is gone"
    )
    assert [r["id"] for r in await rows(nats_config)] == [entry_id]


# -- ids ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry_id", ["0", "-1"])
@pytest.mark.parametrize(
    "command", [["show"], ["replay"], ["purge", "--yes"]], ids=["show", "replay", "purge"]
)
async def test_an_id_below_1_is_a_usage_error(
    nats_config: NATSConfig, mixed: Mixed, command: list[str], entry_id: str
) -> None:
    """Given a dead-letter stream with entries,
    when `dlq show`, `replay` or `purge` is given the id 0 or -1,
    then it exits 2 (bad usage) with an `Error:` line and no traceback, and nothing changes."""
    result = await dlq(nats_config, command[0], entry_id, *command[1:])

    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines()[-1].startswith("Error: ")
    assert "Traceback" not in result.output
    assert [row["id"] for row in await rows(nats_config)] == mixed.ids


# -- at the scale of an outage ------------------------------------------------------------------

#: `dlq replay`'s last line.
SUMMARY = re.compile(r"replayed (\d+), failed (\d+), in \d+\.\d s, \d+/s")
_fake_seqs = itertools.count(1)


async def fill(
    bus: NATSEventBus,
    events: list[Event],
    *,
    subject: str | None = None,
    error: BaseException | None = None,
    failed_at: datetime | None = None,
) -> None:
    """A dead letter of each event (the events themselves are not stored), published many at
    a time as `DeadLetterQueue.record` would store them; `subject` replaces the events' own."""
    config = bus.config
    queue = DeadLetterQueue(bus)
    await queue.ensure()
    async with bus.publish_window() as window:
        for event in events:
            message = Stored(
                config.stream_name,
                next(_fake_seqs),
                subject or config.subject_for(event.type),
                event.to_json(),
                event_headers(event),
            )
            record = DeadLetterRecord.of(
                message,
                reason="rejected: test",
                consumer=DURABLE,
                handler="check",
                error=error if error is not None else Reject("test"),
                failed_at=failed_at,
            )
            await window.publish(*queue.encoded(record), what="a test's dead letter")
        await window.flush()


def nodes(n: int, kind: str = "up") -> list[Event]:
    if kind == "up":
        return [new_node_up_event("test", f"node-{i}") for i in range(n)]
    return [new_node_down_event("test", f"node-{i}", "lost") for i in range(n)]


async def ids(config: NATSConfig, *args: str) -> list[int]:
    """The ids `dlq list --json ARGS...` lists."""
    result = await dlq(config, "list", "--json", *args)
    assert result.exit_code == 0, result.output
    return [json.loads(line)["id"] for line in result.stdout.splitlines()]


def summed_up(result: Result) -> tuple[int, int]:
    """(replayed, failed) from `dlq replay`'s summary line, checked to be its last line."""
    found = SUMMARY.fullmatch(result.stdout.splitlines()[-1])
    assert found is not None, result.stdout
    return int(found[1]), int(found[2])


async def test_replay_all_of_2000_dead_letters_puts_each_event_back_once_and_empties_the_dlq(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given 2,000 dead letters of node.up and node.down events,
    when `dlq replay --all` runs (not on a terminal),
    then it prints one summary line, every event is back on its own subject exactly once,
    with the replay's message id `<event id>:replay:<dlq stream>:<dead letter id>`, and the
    dead-letter stream is empty."""
    events = nodes(1500) + nodes(500, "down")
    await fill(event_bus, events)
    dead = {entry.record.event_id: entry.id async for entry in DeadLetterQueue(event_bus).entries()}

    result = await dlq(nats_config, "replay", "--all")

    assert result.exit_code == 0, result.output
    assert (len(result.stdout.splitlines()), summed_up(result)) == (1, (2000, 0))
    stored = [m async for m in event_bus.stream_messages(nats_config.stream_name)]
    assert sorted((m.subject, m.data) for m in stored) == sorted(
        (nats_config.subject_for(e.type), e.to_json()) for e in events
    )
    stream = nats_config.dlq_stream_name
    assert {m.headers["Nats-Msg-Id"] for m in stored} == {
        f"{event_id}:replay:{stream}:{entry_id}" for event_id, entry_id in dead.items()
    }
    assert await DeadLetterQueue(event_bus).count() == 0


async def test_a_replay_that_fails_for_some_records_removes_only_those_acked(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given 300 dead letters, every third of an event whose subject no stream captures
    (its stream was deleted, say),
    when `dlq replay --all` runs,
    then the 200 others are back on their subjects and removed, the 100 stay, named by one
    error line, the summary counts both, and it exits 1; once a stream captures that subject,
    replaying again brings those 100 back too."""
    nowhere = f"{nats_config.dlq_subject_prefix}x.nowhere"
    events = nodes(300)
    for n, event in enumerate(events):
        await fill(event_bus, [event], subject=nowhere if n % 3 == 2 else None)
    stayed = (await ids(nats_config))[2::3]

    result = await dlq(nats_config, "replay", "--all")

    assert result.exit_code == 1, result.output
    assert summed_up(result) == (200, 100)
    named = ", ".join(f"#{n}" for n in stayed[:10])
    assert result.stderr.splitlines() == [
        f"Error: 100 dead letters not replayed ({named} and 90 more): publish to {nowhere} "
        "failed: no stream listens on the subject"
    ]
    assert await ids(nats_config) == stayed
    replayed = await stream_data(event_bus, nats_config.stream_name)
    assert sorted(replayed) == sorted(e.to_json() for n, e in enumerate(events) if n % 3 != 2)

    await jetstream.add_stream(name=f"{nats_config.stream_name}_X", subjects=[nowhere])
    again = await dlq(nats_config, "replay", "--all")

    assert (again.exit_code, summed_up(again)) == (0, (100, 0))
    assert await ids(nats_config) == []


async def test_dry_run_says_what_would_go_where_and_changes_nothing(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given 30 dead letters of node.up and 12 of node.down events, and a message in the
    dead-letter stream that is not a record,
    when `dlq replay --all --dry-run` runs,
    then it counts what would be replayed per subject and event type, names the message it
    would not replay, and changes nothing: both streams are as they were."""
    await fill(event_bus, nodes(30))
    await fill(event_bus, nodes(12, "down"))
    foreign = await event_bus.publish_raw(f"{nats_config.dlq_subject_prefix}.x.y", b"junk", {})
    before = await ids(nats_config)

    result = await dlq(nats_config, "replay", "--all", "--dry-run")

    assert result.exit_code == 0, result.output
    up, down = nats_config.subject_for("node.up"), nats_config.subject_for("node.down")
    width = len(down)
    assert result.stdout.splitlines() == [
        "would replay 42 dead letter(s), changing nothing now",
        f"count  {'subject'.ljust(width)}  event_type",
        f"12     {down.ljust(width)}  node.down",
        f"30     {up.ljust(width)}  node.up",
        f"dead letter #{foreign} would not be replayed: not a dead-letter record (no "
        "Gdc-Dlq-Record header)",
    ]
    assert await ids(nats_config) == before
    assert await stream_data(event_bus, nats_config.stream_name) == []


async def test_rate_spreads_the_replay_out(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given 30 dead letters,
    when `dlq replay --all --rate 10` runs,
    then the events come back a few at a time (the event stream is seen holding some but not
    all of them, at several counts) and in the end all of them, with the DLQ empty."""
    await fill(event_bus, nodes(30))
    seen: set[int] = set()
    result: list[Result] = []

    async def replay() -> None:
        result.append(await dlq(nats_config, "replay", "--all", "--rate", "10"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(replay)
        with anyio.fail_after(60):
            while not result:
                seen.add(await event_bus.count_messages(nats_config.stream_name))
                await anyio.sleep(0.05)

    assert (result[0].exit_code, summed_up(result[0])) == (0, (30, 0))
    assert len(seen - {0, 30}) >= 3, sorted(seen)
    assert await event_bus.count_messages(nats_config.stream_name) == 30
    assert await ids(nats_config) == []


@pytest.fixture
async def aged(nats_config: NATSConfig, event_bus: NATSEventBus) -> dict[str, list[int]]:
    """Dead letters by kind: `old` (Reject, 2 hours ago), `timeouts` (TimeoutError, now),
    `rejected` (Reject, now), and `foreign`, a message that is not a record."""
    two_hours_ago = datetime.now(UTC) - timedelta(hours=2)
    await fill(event_bus, nodes(3), failed_at=two_hours_ago)
    await fill(event_bus, nodes(2), error=TimeoutError("slow pin service"))
    await fill(event_bus, nodes(1))
    foreign = await event_bus.publish_raw(f"{nats_config.dlq_subject_prefix}.x.y", b"junk", {})
    all_ids = await ids(nats_config)
    return {
        "old": all_ids[:3],
        "timeouts": all_ids[3:5],
        "rejected": all_ids[5:6],
        "foreign": [foreign],
    }


@pytest.mark.parametrize(
    ("args", "kinds"),
    [
        pytest.param(["--since", "1h"], ["timeouts", "rejected"], id="since-1h"),
        pytest.param(["--since", "90m"], ["timeouts", "rejected"], id="since-90m"),
        pytest.param(["--since", "3h"], ["old", "timeouts", "rejected"], id="since-3h"),
        pytest.param(["--since", "1d"], ["old", "timeouts", "rejected"], id="since-1d"),
        pytest.param(["--error", "TimeoutError"], ["timeouts"], id="error"),
        pytest.param(["--error", "Reject"], ["old", "rejected"], id="error-reject"),
        pytest.param(["--error", "Reject", "--since", "1h"], ["rejected"], id="both"),
        pytest.param(["--error", "KeyError"], [], id="no-such-error"),
    ],
)
async def test_list_since_and_error_select_the_records_that_match(
    nats_config: NATSConfig, aged: dict[str, list[int]], args: list[str], kinds: list[str]
) -> None:
    """Given dead letters of two hours ago and of now, with two error types, and a message
    that is not a record,
    when `dlq list` runs with --since (an age) and/or --error,
    then it lists exactly the records that failed since then and/or with that error type."""
    assert await ids(nats_config, *args) == sorted(n for kind in kinds for n in aged[kind])


async def test_list_since_takes_an_iso_time(
    nats_config: NATSConfig, aged: dict[str, list[int]]
) -> None:
    """Given dead letters of two hours ago and of now,
    when `dlq list --since` is given an ISO time of an hour ago, with an offset or in local
    time without one,
    then it lists the records of now."""
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    recent = aged["timeouts"] + aged["rejected"]

    for given in (hour_ago.isoformat(), hour_ago.astimezone().replace(tzinfo=None).isoformat()):
        assert await ids(nats_config, "--since", given) == recent


async def test_replay_all_with_error_replays_only_those(
    nats_config: NATSConfig, event_bus: NATSEventBus, aged: dict[str, list[int]]
) -> None:
    """Given dead letters with two error types,
    when `dlq replay --all --error TimeoutError` runs,
    then just those two are replayed and removed, and the rest stay."""
    result = await dlq(nats_config, "replay", "--all", "--error", "TimeoutError")

    assert (result.exit_code, summed_up(result)) == (0, (2, 0))
    assert await ids(nats_config) == sorted(aged["old"] + aged["rejected"] + aged["foreign"])


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["list", "--since", "yesterday"], "Error: --since 'yesterday': give a time ago"),
        (["list", "--since", "10x"], "Error: --since '10x': give a time ago"),
        (["replay", "--all", "--since", ""], "Error: --since '': give a time ago"),
        (["replay", "--all", "--rate", "0"], "Error: --rate '0': give records per second"),
        (["replay", "--all", "--rate", "-5"], "Error: --rate '-5': give records per second"),
        (["replay", "--all", "--rate", "fast"], "Error: --rate 'fast': give records per second"),
        (["replay", "--all", "--rate", "inf"], "Error: --rate 'inf': give records per second"),
    ],
)
async def test_a_bad_since_or_rate_is_one_usage_line(
    nats_config: NATSConfig, event_bus: NATSEventBus, args: list[str], said: str
) -> None:
    """Given dead letters,
    when `dlq list`/`dlq replay` gets a --since or --rate it cannot read,
    then it exits 2 (bad usage) with one `Error:` line saying what it takes, and nothing is
    replayed."""
    await fill(event_bus, nodes(2))

    result = await dlq(nats_config, *args)

    assert result.exit_code == 2, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(said)
    assert len(await ids(nats_config)) == 2


async def test_on_a_terminal_replay_shows_a_progress_bar_with_the_rate_and_eta(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given 45 dead letters,
    when `gdc-worker dlq replay --all --rate 15` runs (3 s) with its stderr on a terminal,
    then the terminal shows a progress bar with the count, the percentage, the time left and
    the rate, up to 45/45, and stdout gets the summary line alone."""
    await fill(event_bus, nodes(45))

    shown, stdout = await anyio.to_thread.run_sync(on_a_terminal, nats_config, "--rate", "15")

    assert SUMMARY.fullmatch(stdout.strip()), stdout
    frames = [f.strip() for f in re.sub(r"\x1b\[\?25[lh]", "\n", shown).splitlines() if f.strip()]
    bar = r"replaying\s+\[[#-]+\]\s+"
    eta = re.compile(bar + r"\d+/45\s+\d+%\s+\d\d:\d\d:\d\d\s+\d+/s")
    assert any(eta.fullmatch(frame) for frame in frames), frames
    assert re.fullmatch(bar + r"45/45\s+100%\s+\d+/s", frames[-1]), frames


def on_a_terminal(config: NATSConfig, *args: str) -> tuple[str, str]:
    """`gdc-worker dlq replay --all ARGS...` as a subprocess with stderr on a pseudo-terminal:
    what the terminal showed, and stdout."""
    controller, terminal = pty.openpty()
    with subprocess.Popen(
        [sys.executable, "-m", "gdc_worker", "dlq", "replay", "--all", *args],
        env=worker_env(config),
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
    ) as process:
        os.close(terminal)
        shown = b""
        with contextlib.suppress(OSError):  # EIO once the process has closed the terminal
            while chunk := os.read(controller, 4096):
                shown += chunk
        stdout, _ = process.communicate(timeout=60)
    os.close(controller)
    assert process.returncode == 0, shown
    return shown.decode(), stdout


async def test_list_reads_large_records_in_order_and_leaves_no_consumer_behind(
    nats_config: NATSConfig, event_bus: NATSEventBus, jetstream: JetStreamContext
) -> None:
    """Given 30 dead letters of 600 KB events (18 MB, more than one read brings),
    when `dlq list` runs, and `dlq list --limit 2`,
    then it lists all 30 in id order (the first two), and the dead-letter stream has no
    consumer left after either."""
    await fill(event_bus, [blob_event(600_000) for _ in range(30)])

    everything = await ids(nats_config)
    first_two = await ids(nats_config, "--limit", "2")

    assert everything == list(range(1, 31))
    assert first_two == [1, 2]
    assert await jetstream.consumers_info(nats_config.dlq_stream_name) == []


# -- records of other versions and tools ------------------------------------------------------


def foreign_record(**fields: object) -> dict[str, str]:
    """The headers of a record as another tool or version might write it."""
    record: dict[str, object] = {
        "failed_at": "2024-05-01T10:00:00Z",
        "reason": "rejected",
        "consumer": DURABLE,
        "handler": "check",
        "stream": "GDC_EVENTS",
        "stream_seq": 1,
        "subject": "gdc.events.blob.stored",
        "deliveries": 1,
    }
    return {"Gdc-Dlq-Record": json.dumps({**record, **fields})}


async def test_a_record_whose_time_has_no_offset_is_filtered_by_since_as_utc(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given a record (of another tool) whose failed_at has no UTC offset, and one with,
    when `dlq list --since` runs with a time before both, and with one between them,
    then it exits 0 and selects them as if the time without an offset were UTC."""
    await DeadLetterQueue(event_bus).ensure()
    subject = f"{nats_config.dlq_subject_prefix}.{DURABLE}.{BLOB}"
    naive = await event_bus.publish_raw(
        subject, b"{}", foreign_record(failed_at="2024-05-01T10:00:00")
    )
    later = await event_bus.publish_raw(
        subject, b"{}", foreign_record(failed_at="2024-05-02T10:00:00+00:00")
    )

    both = await dlq(nats_config, "list", "--json", "--since", "2024-05-01T09:00:00+00:00")
    one = await dlq(nats_config, "list", "--json", "--since", "2024-05-01T11:00:00+00:00")

    assert both.exit_code == 0, both.output
    assert [json.loads(line)["id"] for line in both.stdout.splitlines()] == [naive, later]
    assert json.loads(both.stdout.splitlines()[0])["failed_at"] == "2024-05-01T10:00:00+00:00"
    assert one.exit_code == 0, one.output
    assert [json.loads(line)["id"] for line in one.stdout.splitlines()] == [later]


async def test_list_and_show_print_a_record_s_control_characters_escaped(
    nats_config: NATSConfig, event_bus: NATSEventBus
) -> None:
    """Given a record whose consumer, reason and error hold newlines and terminal escape
    sequences (written by anything that can publish to the dead-letter stream),
    when `dlq list` and `dlq show` print it,
    then the table has one line per entry, each field of `show` is one line, and no escape
    sequence reaches the terminal."""
    await DeadLetterQueue(event_bus).ensure()
    subject = f"{nats_config.dlq_subject_prefix}.{DURABLE}.{BLOB}"
    odd = foreign_record(
        consumer="c\x1b[2J",
        reason="\x1b[31mred\nline two",
        error_type="Boom\nX",
        error_message="multi\nline",
        traceback="Traceback:\n  \x1b[2Jframe\nBoom: x\n",
    )
    entry_id = await event_bus.publish_raw(subject, b"{}", odd)

    listed = await dlq(nats_config, "list")
    shown = await dlq(nats_config, "show", str(entry_id))

    assert listed.exit_code == 0, listed.output
    assert len(listed.stdout.splitlines()) == 2  # the header and the entry
    assert "\x1b" not in listed.stdout
    assert shown.exit_code == 0, shown.output
    assert "\x1b" not in shown.stdout
    lines = shown.stdout.splitlines()
    assert "reason:      \\x1b[31mred\\nline two" in lines
    assert "error:       Boom\\nX: multi\\nline" in lines
    assert "  \\x1b[2Jframe" in lines  # the traceback keeps its lines


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["purge", "--all", "--yes", "--type", ""], "--type"),
        (["purge", "--all", "--yes", "--consumer", ""], "--consumer"),
        (["purge", "--all", "--yes", "--consumer", " "], "--consumer"),
        (["purge", "--all", "--yes", "--error", ""], "--error"),
        (["replay", "--all", "--type", ""], "--type"),
        (["replay", "--all", "--type", "node up"], "--type"),
        (["list", "--type", "node..up"], "--type"),
        (["show", str(2**64)], "ID"),
        (["purge", "--yes", str(2**64)], "ID"),
    ],
)
async def test_an_empty_or_impossible_filter_is_bad_usage_and_changes_nothing(
    nats_config: NATSConfig, event_bus: NATSEventBus, args: list[str], named: str
) -> None:
    """Given dead letters,
    when `dlq` gets an empty --type, --consumer or --error (an unset shell variable, say), a
    type that is no subject, or an id beyond what a stream can hold,
    then it exits 2 with an error naming the option, and every dead letter is still there:
    an empty filter must not mean "all"."""
    await fill(event_bus, nodes(3))
    before = await ids(nats_config)

    result = await dlq(nats_config, *args)

    assert result.exit_code == 2, result.output
    assert named in result.stderr
    assert await ids(nats_config) == before
    assert len(before) == 3


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_a_replay_stopped_by_a_signal_says_what_it_did_and_what_is_left(
    nats_config: NATSConfig, event_bus: NATSEventBus, tmp_path: Path, signum: int
) -> None:
    """Given 40 dead letters and `dlq replay --all --rate 10` under way,
    when it gets SIGINT (Ctrl-C) or SIGTERM,
    then it stops sending, sums up what it replayed and that it was stopped, and exits 1;
    and every record it did not say it replayed is still in the DLQ."""
    await fill(event_bus, nodes(40))
    replay = Process(
        ["dlq", "replay", "--all", "--rate", "10", "-v"], worker_env(nats_config), tmp_path / "r"
    )
    try:
        await eventually(lambda: replay.stdout.count("replayed #") >= 3, "3 records replayed")
        replay.send(signum)
        code = await replay.exit_code()
    finally:
        replay.close()

    assert code == 1, replay.stderr
    said = replay.stdout.splitlines()
    replayed = {int(m[1]) for m in (re.match(r"replayed #(\d+):", s) for s in said) if m}
    assert said[-1].startswith(f"replayed {len(replayed)}, failed 0, in ")
    assert "Error: stopped by a signal" in replay.stderr
    left = await ids(nats_config)
    assert len(replayed) + len(left) == 40
    assert not replayed & set(left)
    assert 3 <= len(replayed) < 40
