"""The dead-letter stream: what a worker records when it gives up, and what operators do with it.

Each record is one message on `<dlq_subject_prefix>.<consumer>.<event type>` (`.invalid` when the
message was not an event) in the `dlq_stream_name` stream; its stream sequence is its id. Its
payload is the original message's bytes, as they were delivered, and the `Gdc-Dlq-Record`
header holds the rest as one line of JSON: why and when, the error, a bounded traceback and the
original headers. So a record fits wherever the original did. When the header and the bytes
together would not fit the server's max_payload, the record keeps only the header and refers to
the original by its stream and sequence (`"data": "ref"`); `get()` and `replay()` read it there.

Anything else in the stream (a message someone else published there, a damaged header) is an
unreadable entry: listed, shown and purged like the others, never replayed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
import traceback
from collections import Counter
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Mapping,
)
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .bus.admin import StreamSpec
from .bus.publish import AsyncPublishWindow, message_size
from .errors import (
    DeadLetterNotFound,
    DeadLetterUnreadable,
    EventDecodeError,
    GDCWorkerError,
    PublishError,
    message_of,
)
from .events import MSG_ID_HEADER, Event
from .subjects import is_event_type, safe_name

if TYPE_CHECKING:
    from .bus import NATSEventBus, StoredMessage

__all__ = [
    "REMOVERS",
    "DeadLetterEntry",
    "DeadLetterQueue",
    "DeadLetterRecord",
    "FailedMessage",
    "ReplayPlan",
    "ReplaySummary",
]

log = logging.getLogger(__name__)

INVALID_TYPE = "invalid"
#: The header of a record message that holds everything but the original bytes.
RECORD_HEADER = "Gdc-Dlq-Record"
#: How much of a traceback a record keeps: its end, where the error is.
TRACEBACK_LIMIT = 4096
#: How much of a reason or an error message a record keeps.
TEXT_LIMIT = 1024
#: How much of one line of a traceback (an error message, mostly) a record keeps.
LINE_LIMIT = 512
#: How many bytes of a message that is not a record `DeadLetterEntry.head` keeps.
HEAD_LIMIT = 200
#: How many deletes of replayed records `DeadLetterQueue.replay_many` keeps in flight.
REMOVERS = 32


class FailedMessage(Protocol):
    """What a record needs of the message given up: a worker's `Delivery` has it all."""

    @property
    def stream(self) -> str: ...
    @property
    def stream_seq(self) -> int: ...
    @property
    def subject(self) -> str: ...
    @property
    def deliveries(self) -> int: ...
    @property
    def data(self) -> bytes: ...
    @property
    def headers(self) -> Mapping[str, str]: ...


class DeadLetterRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Why and when a message was given up, with the message as it was delivered.

    `event_type` and `event_id` come from `event` when it is given (`invalid` and "" for a
    message that is not an event). A record stored by reference (`by_reference`) has its `data`,
    `headers` and `event` only once read back from the event stream, by `DeadLetterQueue.get`.
    In the stream, the record without `data` and `event` is the `Gdc-Dlq-Record` header.
    """

    failed_at: datetime
    reason: str
    consumer: str
    handler: str
    stream: str
    stream_seq: int
    subject: str
    deliveries: int
    error_type: str = ""
    error_message: str = ""
    traceback: str = ""
    data: bytes = b""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    event: Event | None = None
    event_type: str = ""
    event_id: str = ""
    #: The size of the original bytes.
    size: int = 0
    #: The original was too large to copy: its bytes stay at `stream` #`stream_seq`.
    by_reference: bool = False
    #: For a record by reference, the SHA-256 of the original bytes, to recognise them.
    data_sha256: str = ""

    def __post_init__(self) -> None:
        if self.event is not None:
            self.event_type = self.event_type or self.event.type
            self.event_id = self.event_id or self.event.id
        self.event_type = self.event_type or INVALID_TYPE

    @classmethod
    def of(
        cls,
        message: FailedMessage,
        *,
        reason: str,
        consumer: str,
        handler: str,
        error: BaseException | None,
        failed_at: datetime | None = None,
    ) -> DeadLetterRecord:
        """The record of `message` given up by `consumer` (its `handler`) after `error`.

        The reason and the error message are cut to about a kilobyte, the traceback to its
        last 4 KB, each saying so.
        """
        try:
            event: Event | None = Event.from_json(message.data)
        except EventDecodeError:
            event = None
        return cls(
            failed_at=failed_at or datetime.now(UTC),
            reason=_cut(reason),
            consumer=consumer,
            handler=handler,
            stream=message.stream,
            stream_seq=message.stream_seq,
            subject=message.subject,
            deliveries=message.deliveries,
            error_type=type(error).__name__ if error is not None else "",
            error_message=_cut(message_of(error)) if error is not None else "",
            traceback=_traceback(error),
            data=bytes(message.data),
            headers=dict(message.headers),
            event=event,
            size=len(message.data),
        )


@dataclass(frozen=True)
class DeadLetterEntry:
    """One message of the dead-letter stream and its id (its sequence there).

    Most are records; one that is not (published there by something else, or damaged) is
    unreadable: `readable` is False, `problem` says why, and `subject`, `size` and `head` (its
    first bytes) are all there is. `problem` is also set for a record by reference whose
    original cannot be read any more. `record` raises `DeadLetterUnreadable` when there is none.
    """

    id: int
    stored: DeadLetterRecord | None = None
    problem: str = ""
    subject: str = ""
    size: int = 0
    head: bytes = b""

    @property
    def readable(self) -> bool:
        """Whether this is a dead-letter record."""
        return self.stored is not None

    @property
    def record(self) -> DeadLetterRecord:
        """The record; raises `DeadLetterUnreadable` for a message that is not one."""
        if self.stored is None:
            raise DeadLetterUnreadable(f"dead letter #{self.id} is unreadable: {self.problem}")
        return self.stored


@dataclass
class ReplaySummary:
    """What `DeadLetterQueue.replay_many` did: how many records are back on their subjects
    (and removed), which stayed and why (by id), and how long it took."""

    replayed: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    seconds: float = 0.0
    #: It stopped early, when told to (`replay_many(stop=...)`): the rest was not tried.
    stopped: bool = False

    @property
    def rate(self) -> float:
        """Records replayed per second."""
        return self.replayed / self.seconds if self.seconds > 0 else 0.0


@dataclass
class ReplayPlan:
    """What a replay would do (`DeadLetterQueue.plan`): how many records go back to each
    (subject, event type), and which cannot be replayed and why (by id)."""

    targets: Counter[tuple[str, str]] = field(default_factory=Counter)
    unreplayable: dict[int, str] = field(default_factory=dict)


class DeadLetterQueue:
    """Write, list, replay and purge dead letters through a connected bus."""

    def __init__(self, bus: NATSEventBus) -> None:
        self._bus = bus
        config = bus.config
        self.stream = config.dlq_stream_name
        self.prefix = config.dlq_subject_prefix

    async def ensure(self) -> None:
        """Create or update the dead-letter stream."""
        config = self._bus.config
        await self._bus.ensure_stream(
            StreamSpec(
                self.stream,
                (f"{self.prefix}.>",),
                max_age=config.dlq_max_age,
                duplicate_window=min(config.duplicate_window, config.dlq_max_age or float("inf")),
                replicas=config.replicas,
            )
        )

    async def record(
        self,
        *,
        reason: str,
        consumer: str,
        handler: str,
        delivery: FailedMessage,
        error: BaseException | None,
    ) -> int:
        """Store a record and wait for the ack; returns its id.

        Its message id is `<stream>:<seq>:<consumer>`, so the same failure recorded twice (a
        worker that died between recording and terminating) is stored once within the
        duplicate window, while two consumers failing the same event get a record each.

        A publish that fails (the dead-letter stream was deleted, say) sets the stream up again
        and is tried once more; if that fails too, its `PublishError` is raised.
        """
        record = DeadLetterRecord.of(
            delivery, reason=reason, consumer=consumer, handler=handler, error=error
        )
        subject, payload, headers = self.encoded(record)
        what = f"dead letter of {record.subject}"
        try:
            return await self._bus.publish_raw(subject, payload, headers, what=what)
        except PublishError as first:
            try:
                await self.ensure()
            except GDCWorkerError as exc:
                raise PublishError(
                    f"{first}; setting up {self.stream} again failed: {exc}"
                ) from None
            seq = await self._bus.publish_raw(subject, payload, headers, what=what)
            log.warning("%s; set up the dead-letter stream %s again: stored", first, self.stream)
            return seq

    def encoded(self, record: DeadLetterRecord) -> tuple[str, bytes, dict[str, str]]:
        """The subject, payload and headers `record` is stored with (see `record`)."""
        event_type = record.event_type
        if not is_event_type(event_type):
            event_type = INVALID_TYPE  # a type that is no subject would make the record unstorable
        subject = f"{self.prefix}.{safe_name(record.consumer)}.{event_type}"
        msg_id = f"{record.stream}:{record.stream_seq}:{record.consumer}"
        return (subject, *_encode(record, msg_id, self._bus.max_payload))

    async def entries(
        self,
        *,
        event_type: str | None = None,
        consumer: str | None = None,
        limit: int | None = None,
        since: datetime | None = None,
        error_type: str | None = None,
    ) -> AsyncIterator[DeadLetterEntry]:
        """Entries in id order, optionally only of one event type and/or consumer, and only
        records that failed at or after `since` and/or with an error of type `error_type`
        (such as `Reject`; these two filters leave out unreadable entries, which have neither).

        Messages that are not records come as unreadable entries (see `DeadLetterEntry`);
        records by reference come without their original (see `get`).
        """
        count = 0
        messages = self._bus.stream_messages(self.stream, self._subject(event_type, consumer))
        async with aclosing(messages):
            async for message in messages:
                if limit is not None and count >= limit:
                    return
                entry = _entry(message)
                if _matches(entry, since, error_type):
                    count += 1
                    yield entry

    async def count(
        self,
        *,
        event_type: str | None = None,
        consumer: str | None = None,
        since: datetime | None = None,
        error_type: str | None = None,
    ) -> int:
        """How many entries `entries` would give with these filters.

        `since` and `error_type` are in the records, so with them the entries are read.
        """
        if since is None and error_type is None:
            subject = self._subject(event_type, consumer)
            return await self._bus.count_messages(self.stream, subject)
        selected = self.entries(
            event_type=event_type, consumer=consumer, since=since, error_type=error_type
        )
        return sum([1 async for _ in selected])

    async def selected(self, ids: Iterable[int]) -> AsyncIterator[DeadLetterEntry]:
        """The entries of these ids, as `entries` gives them; an id with none comes as an
        unreadable entry saying so, for `replay_many` to report."""
        for entry_id in ids:
            message = await self._bus.get_message(self.stream, entry_id)
            if message is None:
                yield DeadLetterEntry(entry_id, problem=f"no such dead letter in {self.stream}")
            else:
                yield _entry(message)

    def _subject(self, event_type: str | None, consumer: str | None) -> str:
        if event_type is None and consumer is None:
            return f"{self.prefix}.>"  # also what others put on `<prefix>.x`
        who = safe_name(consumer) if consumer else "*"
        return f"{self.prefix}.{who}.{event_type or '>'}"

    async def get(self, entry_id: int) -> DeadLetterEntry:
        """One entry by id, a record by reference with its original; raises `DeadLetterNotFound`.

        When that original is gone from the event stream, the entry says so in `problem`.
        """
        entry = _entry(await self._stored(entry_id))
        if entry.readable and entry.record.by_reference:
            return await self._with_original(entry)
        return entry

    async def replay(self, entry_id: int) -> DeadLetterEntry:
        """Publish the original message again on its subject, then remove the record.

        The message keeps its bytes (and so the event its id) and its headers, but gets a new
        `Nats-Msg-Id`, so the event stream does not drop it as a duplicate inside its window.
        Raises `DeadLetterNotFound`, and `DeadLetterUnreadable` for a message that is not a
        record or a record whose original is gone.
        """
        entry, problem = await self._replayable(_entry(await self._stored(entry_id)))
        if problem:
            raise DeadLetterUnreadable(f"dead letter #{entry_id} cannot be replayed: {problem}")
        record = entry.record
        await self._bus.publish_raw(
            record.subject,
            record.data,
            self._replay_headers(entry),
            what=f"replay of dead letter {entry_id}",
        )
        await self._bus.delete_message(self.stream, entry_id, erase=False)  # see replay_many
        return entry

    async def replay_many(
        self,
        entries: AsyncIterable[DeadLetterEntry],
        *,
        rate: float | None = None,
        on_done: Callable[[DeadLetterEntry, str | None], None] | None = None,
        stop: anyio.Event | None = None,
    ) -> ReplaySummary:
        """Replay `entries` as `replay` does, thousands a second: publishes go out without
        waiting for each ack, and each record is deleted once its replay is acked, by
        `REMOVERS` deletes in flight.

        A record whose replay fails (or that cannot be replayed) stays, and the summary says
        why. `rate` caps the publishes per second. `on_done(entry, error)` hears of each entry
        once it is settled: replayed and removed (`error` None), or left with why. Once
        `stop` is set, no more is sent; what was sent is settled, and `stopped` says so.
        """
        summary = ReplaySummary()
        started = time.monotonic()

        def done(entry: DeadLetterEntry, error: str | None) -> None:
            if error is None:
                summary.replayed += 1
            else:
                summary.failed[entry.id] = error
            if on_done is not None:
                on_done(entry, error)

        acked, to_remove = anyio.create_memory_object_stream[DeadLetterEntry](math.inf)
        async with anyio.create_task_group() as tg:
            for _ in range(REMOVERS):
                tg.start_soon(self._remove_replayed, to_remove.clone(), done)
            to_remove.close()
            async with acked, self._bus.publish_window() as window:
                pace = _Pace(rate)
                async for selected in entries:
                    if stop is not None and stop.is_set():
                        summary.stopped = True
                        break
                    entry, problem = await self._replayable(selected)
                    if problem:
                        done(entry, problem)
                        continue
                    await pace.wait(stop)
                    if stop is not None and stop.is_set():
                        summary.stopped = True
                        break
                    await self._send_replay(window, entry, acked, done)
                with contextlib.suppress(PublishError):
                    await window.flush()  # each failure went to its entry's `done` already
        summary.seconds = time.monotonic() - started
        return summary

    async def plan(self, entries: AsyncIterable[DeadLetterEntry]) -> ReplayPlan:
        """What `replay_many` would do with `entries`, changing nothing."""
        plan = ReplayPlan()
        async for selected in entries:
            entry, problem = await self._replayable(selected)
            if problem:
                plan.unreplayable[entry.id] = problem
            else:
                plan.targets[entry.record.subject, entry.record.event_type] += 1
        return plan

    async def _replayable(self, entry: DeadLetterEntry) -> tuple[DeadLetterEntry, str]:
        """The entry with its original loaded, and why it cannot be replayed ("" if it can)."""
        if not entry.readable:
            return entry, entry.problem
        if entry.record.by_reference:
            entry = await self._with_original(entry)
            if entry.problem:
                return entry, entry.problem
        if not entry.record.subject:
            return entry, "its original message was gone before it was recorded"
        return entry, ""

    def _replay_headers(self, entry: DeadLetterEntry) -> dict[str, str]:
        replay_id = f"{self.stream}:{entry.id}"
        return _replay_headers(entry.record, replay_id, self._bus.max_payload)

    async def _send_replay(
        self,
        window: AsyncPublishWindow,
        entry: DeadLetterEntry,
        acked: MemoryObjectSendStream[DeadLetterEntry],
        done: Callable[[DeadLetterEntry, str | None], None],
    ) -> None:
        record = entry.record

        def stored(outcome: str, error: PublishError | None, seq: int | None) -> None:
            # A duplicate is a replay stored before (its ack lost): it is there all the same.
            if error is None:
                acked.send_nowait(entry)
            else:
                done(entry, f"publish to {record.subject} failed: {error}")

        try:
            await window.publish(
                record.subject,
                record.data,
                self._replay_headers(entry),
                what=f"replay of dead letter {entry.id}",
                done=stored,
            )
        except PublishError as exc:
            done(entry, str(exc))

    async def _remove_replayed(
        self,
        replayed: MemoryObjectReceiveStream[DeadLetterEntry],
        done: Callable[[DeadLetterEntry, str | None], None],
    ) -> None:
        async with replayed:
            async for entry in replayed:
                try:
                    # Its bytes are back in the event stream: erasing them here would buy
                    # nothing and cost the server ~4 ms a record.
                    await self._bus.delete_message(self.stream, entry.id, erase=False)
                except GDCWorkerError as exc:
                    done(entry, f"replayed, but still in the dead-letter stream: {exc}")
                else:
                    done(entry, None)

    async def purge(self, entry_id: int) -> None:
        """Delete one entry, readable or not; raises `DeadLetterNotFound`."""
        await self._stored(entry_id)  # the server's answer for a missing sequence varies
        if not await self._bus.delete_message(self.stream, entry_id):
            raise DeadLetterNotFound(f"no dead letter with id {entry_id} in {self.stream}")

    async def _stored(self, entry_id: int) -> StoredMessage:
        message = await self._bus.get_message(self.stream, entry_id)  # None: no such stream too
        if message is None:
            raise DeadLetterNotFound(f"no dead letter with id {entry_id} in {self.stream}")
        return message

    async def _with_original(self, entry: DeadLetterEntry) -> DeadLetterEntry:
        record = entry.record
        where = f"{record.stream} #{record.stream_seq}"
        original = await self._bus.get_message(record.stream, record.stream_seq)
        problem = ""
        if original is None:
            problem = f"the message was too large to copy, and {where} is gone"
        elif hashlib.sha256(original.data).hexdigest() != record.data_sha256:
            problem = f"the message was too large to copy, and {where} now holds another one"
        if original is None or problem:
            return replace(entry, problem=problem)
        loaded = msgspec.structs.replace(
            record,
            data=original.data,
            headers=dict(original.headers) or record.headers,
            event=_event_of(original.data),
        )
        return replace(entry, stored=loaded)

    async def depths(self) -> dict[tuple[str, str], int]:
        """How many entries there are per `(consumer, event type)`, counted by the server
        without reading them. Entries others put on a subject of another shape count under
        the rest of their subject, with consumer ""."""
        counts = await self._bus.subject_counts(self.stream, f"{self.prefix}.>")
        depths: dict[tuple[str, str], int] = {}
        for subject, count in counts.items():
            consumer, _, event_type = subject[len(self.prefix) + 1 :].partition(".")
            key = (consumer, event_type) if event_type else ("", consumer)
            depths[key] = depths.get(key, 0) + count
        return depths


_record_decoder = msgspec.json.Decoder(DeadLetterRecord)


def _encode(
    record: DeadLetterRecord, msg_id: str, max_payload: int
) -> tuple[bytes, dict[str, str]]:
    """The payload and headers of the record's message: the original bytes if they fit."""
    header = msgspec.structs.replace(record, data=b"", event=None)
    headers = {MSG_ID_HEADER: msg_id, RECORD_HEADER: _header_json(header)}
    if message_size(headers, record.data) <= max_payload:
        return record.data, headers
    # Too large with the header: keep the header only, and what to find the original by.
    by_reference = msgspec.structs.replace(
        header, by_reference=True, data_sha256=hashlib.sha256(record.data).hexdigest()
    )
    smaller = (
        by_reference,
        msgspec.structs.replace(by_reference, headers={}),
        msgspec.structs.replace(
            by_reference, headers={}, traceback="(left out: too large for the server)"
        ),
    )
    for variant in smaller:
        headers = {MSG_ID_HEADER: msg_id, RECORD_HEADER: _header_json(variant)}
        if message_size(headers, b"") <= max_payload:
            return b"", headers
    raise PublishError(
        f"the dead letter of {record.stream} #{record.stream_seq} does not fit in a message "
        f"of at most {max_payload} bytes, the server's max_payload"
    )


def _header_json(record: DeadLetterRecord) -> str:
    # One line of ASCII: a header value may hold neither CR/LF nor (for nats-py's parser of
    # stored messages) anything but ASCII. JSON escapes both inside strings.
    return json.dumps(msgspec.to_builtins(record), ensure_ascii=True, separators=(",", ":"))


def _entry(message: StoredMessage) -> DeadLetterEntry:
    """The entry of one message of the dead-letter stream; never raises."""
    header = message.headers.get(RECORD_HEADER)
    if header is None:
        return _unreadable(message, f"not a dead-letter record (no {RECORD_HEADER} header)")
    try:
        record = _record_decoder.decode(str(header))
    except msgspec.DecodeError as exc:
        return _unreadable(message, f"its {RECORD_HEADER} header does not decode: {exc}")
    if record.failed_at.tzinfo is None:  # another tool's time without an offset: UTC
        record = msgspec.structs.replace(record, failed_at=record.failed_at.replace(tzinfo=UTC))
    if not record.by_reference:
        record = msgspec.structs.replace(record, data=message.data, event=_event_of(message.data))
    return DeadLetterEntry(message.seq, record, subject=message.subject, size=len(message.data))


def _unreadable(message: StoredMessage, problem: str) -> DeadLetterEntry:
    return DeadLetterEntry(
        message.seq,
        problem=problem,
        subject=message.subject,
        size=len(message.data),
        head=message.data[:HEAD_LIMIT],
    )


def _matches(entry: DeadLetterEntry, since: datetime | None, error_type: str | None) -> bool:
    if since is None and error_type is None:
        return True
    if not entry.readable:
        return False
    record = entry.record
    if since is not None and record.failed_at < since:
        return False
    return error_type is None or record.error_type == error_type


class _Pace:
    """At most `rate` sends a second (no limit when None): the next send waits its turn."""

    def __init__(self, rate: float | None) -> None:
        self._interval = 1 / rate if rate else 0.0
        self._next = 0.0

    async def wait(self, stop: anyio.Event | None = None) -> None:
        """Until the next send's turn, or less: until `stop` is set."""
        if not self._interval:
            return
        now = anyio.current_time()
        self._next = max(self._next, now)  # after a stall, no burst to catch up
        with anyio.move_on_after(self._next - now):
            await (stop.wait() if stop is not None else anyio.sleep_forever())
        self._next += self._interval


def _replay_headers(record: DeadLetterRecord, replay_id: str, max_payload: int) -> dict[str, str]:
    """The original headers with a new message id, or none if the original then does not fit."""
    headers = dict(record.headers)
    original = headers.get(MSG_ID_HEADER) or f"{record.stream}:{record.stream_seq}"
    headers[MSG_ID_HEADER] = f"{original}:replay:{replay_id}"
    if message_size(headers, record.data) > max_payload:
        # No message id at all: the event stream cannot take it for a duplicate either.
        del headers[MSG_ID_HEADER]
    if message_size(headers, record.data) > max_payload:
        raise PublishError(
            f"{record.stream} #{record.stream_seq} with its headers is larger than the "
            f"server's max_payload of {max_payload} bytes"
        )
    return headers


def _event_of(data: bytes) -> Event | None:
    try:
        return Event.from_json(data)
    except EventDecodeError:
        return None


def _cut(text: str, limit: int = TEXT_LIMIT) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]} ... (cut: {len(text)} characters in all)"


def _traceback(error: BaseException | None) -> str:
    if error is None:
        return ""
    # format_exception survives an exception whose __str__ raises ("<exception str() failed>").
    lines = "".join(traceback.format_exception(error)).splitlines()
    text = "\n".join(_cut(line, LINE_LIMIT) for line in lines) + "\n"
    if len(text) <= TRACEBACK_LIMIT:
        return text
    kept = text[-TRACEBACK_LIMIT:]
    kept = kept[kept.find("\n") + 1 :]  # from a line's start
    return f"(traceback cut: its first {len(text) - len(kept)} characters are left out)\n{kept}"
