"""The publish outbox: events waiting in a local SQLite file while JetStream cannot take them.

`Outbox` keeps each event's subject, payload and headers (with its original `Nats-Msg-Id`) in
insertion order, bounded in events and bytes. The file is in WAL mode with a full sync on
every write, so a queued event survives kill -9 (and a power cut), and every read and write
runs on one thread of its own, so the event loop never waits on the disk.

`drain()` publishes the queued events oldest first and removes them only once JetStream acked
them: after a crash in between, they are sent again with the same `Nats-Msg-Id`, which the
stream drops as duplicates within its duplicate window. The bus drains its outbox in the
background (`bus.relay`); `gdc-worker outbox flush` drains one on demand.

An event JetStream refuses for good is set aside in the file's refused table (`refuse`), so
that the events behind it go on; `refused()` lists those, and `requeue()` puts them back at
the end of the queue once the cause is fixed (`gdc-worker outbox refused` and `requeue`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

import anyio
import anyio.to_thread
import msgspec

from .errors import ConfigError, OutboxFull, PublishError, RefusedEventNotFound
from .events import MSG_ID_HEADER

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_EVENTS",
    "DRAIN_BATCH",
    "Outbox",
    "OutboxStats",
    "QueuedEvent",
    "RefusedEvent",
    "drain",
]

DEFAULT_MAX_EVENTS = 100_000
DEFAULT_MAX_BYTES = 256 * 1024**2
#: How many events `drain` publishes before it removes them, in one transaction.
DRAIN_BATCH = 100
#: How long a write waits for another process holding the file (`gdc-worker outbox flush`).
_BUSY_TIMEOUT_MS = 30_000
_SCHEMA_VERSION = 2  # 2: the refused table
#: Marks the file as an outbox (`PRAGMA application_id`: "GDCo"), so that a database of
#: something else named by mistake is refused, not written into.
_APPLICATION_ID = 0x4744436F
# The totals are kept by triggers, so the bounds are checked without counting the rows, and
# stay right when another process drains the same file.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    subject TEXT NOT NULL,
    payload BLOB NOT NULL,
    headers BLOB NOT NULL,
    size INTEGER NOT NULL,
    queued_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS totals (
    one INTEGER PRIMARY KEY CHECK (one = 1), events INTEGER, bytes INTEGER
);
INSERT OR IGNORE INTO totals VALUES (1, 0, 0);
CREATE TRIGGER IF NOT EXISTS counted_in AFTER INSERT ON events BEGIN
    UPDATE totals SET events = events + 1, bytes = bytes + new.size;
END;
CREATE TRIGGER IF NOT EXISTS counted_out AFTER DELETE ON events BEGIN
    UPDATE totals SET events = events - 1, bytes = bytes - old.size;
END;
CREATE TABLE IF NOT EXISTS refused (
    id INTEGER PRIMARY KEY,
    subject TEXT NOT NULL,
    payload BLOB NOT NULL,
    headers BLOB NOT NULL,
    queued_at REAL NOT NULL,
    refused_at REAL NOT NULL,
    reason TEXT NOT NULL
);
"""

T = TypeVar("T")
_headers_decoder = msgspec.json.Decoder(dict[str, str])


class OutboxStats(NamedTuple):
    """What an outbox holds, for `gdc-worker outbox status` and metrics."""

    events: int
    bytes: int
    #: Seconds since the oldest event still there was queued; None when there is none.
    oldest_age_s: float | None
    #: Events set aside because JetStream refuses them for good (`refuse`).
    refused: int = 0


class QueuedEvent(NamedTuple):
    """One event in the outbox, as it will be published."""

    #: Its place in insertion order.
    id: int
    subject: str
    payload: bytes
    headers: dict[str, str]

    @property
    def what(self) -> str:
        """How messages name it: `queued event <Nats-Msg-Id>`."""
        return f"queued event {self.headers.get(MSG_ID_HEADER, f'#{self.id}')}"


class RefusedEvent(NamedTuple):
    """An event set aside in the refused table (`Outbox.refuse`), for an operator."""

    #: Its place in insertion order, kept from when it was queued.
    id: int
    subject: str
    headers: dict[str, str]
    #: When it was queued, and when it was set aside (`time.time()`).
    queued_at: float
    refused_at: float
    #: JetStream's refusal.
    reason: str


class Outbox:
    """A bounded queue of events in a SQLite file; `await Outbox.open(path)`, then `close()`.

    Several processes may share one file: SQLite serializes their writes.
    """

    def __init__(self, path: str, max_events: int, max_bytes: int) -> None:
        """Prepare the thread; `open()` creates the outbox and opens its file."""
        self.path = path
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._conn: sqlite3.Connection | None = None  # used on the outbox's thread only
        self._totals = (0, 0, None, 0)  # events, bytes, when the oldest was queued, refused
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="gdc-outbox", daemon=True)
        self._closed = False

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> Outbox:
        """The outbox in the file at `path`, created if missing (its directory must exist).

        Raises `ConfigError` naming the path when it cannot be used as an outbox.
        """
        outbox = cls(os.fspath(path), max_events, max_bytes)
        outbox._thread.start()
        try:
            await outbox._call(outbox._open, None)
        except sqlite3.Error as exc:
            await outbox.close()
            raise ConfigError(
                f"outbox_path: cannot use {outbox.path} as the outbox: {exc}"
            ) from None
        except BaseException:
            await outbox.close()
            raise
        return outbox

    def stats(self) -> OutboxStats:
        """Depth, bytes and oldest age as of the last read or write; no I/O, from any thread."""
        events, size, oldest, refused = self._totals
        age = None if oldest is None else max(0.0, time.time() - oldest)
        return OutboxStats(events, size, age, refused)

    def submit(
        self, subject: str, payload: bytes, headers: Mapping[str, str], what: str
    ) -> asyncio.Future[None]:
        """Queue an event without waiting: the future is done once it is on disk.

        It fails with `OutboxFull` when the event would pass `max_events` or `max_bytes`, and
        `PublishError` when the file cannot be written; either way nothing is queued.
        """
        blob = msgspec.json.encode(dict(headers))

        def add() -> None:
            with self._transaction():
                events, size = self._read_totals()
                row = len(payload) + len(blob)
                full = self._full(events, size, row)
                if full:
                    raise OutboxFull(f"{what} to {subject} not stored: {full}")
                self._db.execute(
                    "INSERT INTO events (subject, payload, headers, size, queued_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (subject, payload, blob, row, time.time()),
                )

        return self._call(add, f"{what} to {subject} not stored")

    async def add(
        self, subject: str, payload: bytes, headers: Mapping[str, str], what: str
    ) -> None:
        """Queue an event and wait until it is on disk; raises as `submit`'s future."""
        await self.submit(subject, payload, headers, what)

    async def head(self, limit: int) -> list[QueuedEvent]:
        """The oldest `limit` events, in insertion order."""

        def read() -> list[QueuedEvent]:
            with self._transaction():
                rows = self._db.execute(
                    "SELECT id, subject, payload, headers FROM events ORDER BY id LIMIT ?",
                    (limit,),
                ).fetchall()
            return [QueuedEvent(i, s, p, _headers_decoder.decode(h)) for i, s, p, h in rows]

        return await self._call(read)

    async def remove(self, ids: Sequence[int]) -> None:
        """Remove these events (published: JetStream acked them)."""

        def delete() -> None:
            with self._transaction():
                self._db.executemany("DELETE FROM events WHERE id = ?", [(i,) for i in ids])

        await self._call(delete)

    async def refuse(self, event_id: int, reason: str) -> bool:
        """Set event `event_id` aside, in the file's `refused` table with `reason`: JetStream
        refuses it for good, and the events behind it must not wait for it. False when it is
        no longer queued (another process sharing the file drained it or set it aside)."""

        def move() -> bool:
            with self._transaction():
                self._db.execute(
                    "INSERT INTO refused SELECT id, subject, payload, headers, queued_at, ?, ? "
                    "FROM events WHERE id = ?",
                    (time.time(), reason, event_id),
                )
                return self._db.execute("DELETE FROM events WHERE id = ?", (event_id,)).rowcount > 0

        return await self._call(move)

    async def refused(self) -> list[RefusedEvent]:
        """The events set aside (`refuse`), in the order they were queued."""

        def read() -> list[RefusedEvent]:
            rows = self._db.execute(
                "SELECT id, subject, headers, queued_at, refused_at, reason FROM refused "
                "ORDER BY id"
            ).fetchall()
            return [
                RefusedEvent(i, subject, _headers_decoder.decode(h), queued, refused, reason)
                for i, subject, h, queued, refused, reason in rows
            ]

        return await self._call(read)

    async def requeue(self, ids: Sequence[int] | None = None) -> int:
        """Move refused events (those of `ids`, else all) back to the end of the queue, in
        the order they were queued, with their payload and headers (so their Nats-Msg-Id),
        for an operator who fixed why JetStream refused them; returns how many.

        Moves none and raises `RefusedEventNotFound` for an id that is not refused, or
        `OutboxFull` when they would pass the outbox's bounds.
        """

        def move() -> int:
            with self._transaction():
                sizes = dict(
                    self._db.execute("SELECT id, length(payload) + length(headers) FROM refused")
                )
                missing = [i for i in ids or () if i not in sizes]
                if missing:
                    raise RefusedEventNotFound(
                        f"no refused event {', '.join(map(str, missing))} in the outbox "
                        f"{self.path}: `gdc-worker outbox refused` lists them"
                    )
                chosen = sorted(sizes if ids is None else set(ids))
                events, size = self._read_totals()
                for n, event_id in enumerate(chosen):
                    full = self._full(events + n, size, sizes[event_id])
                    if full:
                        raise OutboxFull(f"refused event {event_id} not requeued: {full}")
                    size += sizes[event_id]
                for event_id in chosen:
                    self._db.execute(
                        "INSERT INTO events (subject, payload, headers, size, queued_at) "
                        "SELECT subject, payload, headers, ?, queued_at FROM refused WHERE id = ?",
                        (sizes[event_id], event_id),
                    )
                    self._db.execute("DELETE FROM refused WHERE id = ?", (event_id,))
                return len(chosen)

        return await self._call(move)

    async def close(self) -> None:
        """Finish what was submitted, then close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        if self._thread.is_alive():
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._thread.join)

    async def __aenter__(self) -> Outbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- on the outbox's thread ---------------------------------------------------------------

    def _call(
        self, job: Callable[[], T], failing: str | None = "the outbox failed"
    ) -> asyncio.Future[T]:
        """Run `job` on the outbox's thread; a SQLite error becomes `PublishError`, after
        `failing` (what it means for the caller), unless that is None."""
        if self._closed:
            raise PublishError(f"the outbox at {self.path} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            result: Any = None
            error: BaseException | None = None
            try:
                result = job()
            except sqlite3.Error as exc:
                error = exc if failing is None else PublishError(f"{failing}: {self.path}: {exc}")
            except BaseException as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(_settle, future, result, error)

        self._jobs.put(run)
        return future

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()
        if self._conn is not None:
            self._conn.close()

    def _open(self) -> None:
        if os.path.isdir(self.path):  # SQLite would only say "unable to open database file"
            raise ConfigError(
                f"outbox_path: cannot use {self.path} as the outbox: it is a directory"
            )
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn = conn
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        marked = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is not None
        # Not ours: marked by another application, or unmarked tables that are not an outbox
        # (outboxes of schema 1 and 2 were not marked yet).
        if marked not in (0, _APPLICATION_ID) or (marked == 0 and version == 0 and tables):
            raise ConfigError(
                f"outbox_path: {self.path} is a SQLite database of something else, not an "
                "outbox: give the outbox a file of its own"
            )
        if version > _SCHEMA_VERSION:
            raise ConfigError(
                f"outbox_path: {self.path} is an outbox of schema {version}, which this version "
                "of gdc-worker cannot read"
            )
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        if version < _SCHEMA_VERSION or not marked:  # new, or older (or another process
            # creating it): the schema only adds what is missing
            conn.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA application_id = {_APPLICATION_ID}; "
                f"PRAGMA user_version = {_SCHEMA_VERSION}; COMMIT;"
            )
        with self._transaction():  # the totals, for stats()
            # A write now, so that a file it cannot write is refused here, not at the first
            # publish while NATS is down, when the outbox is what the service relies on.
            self._db.execute("UPDATE totals SET events = events")

    @property
    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None, "the outbox is not open"
        return self._conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction, after which the totals that `stats()` shows are updated."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            events, size = self._read_totals()
            oldest = self._db.execute("SELECT queued_at FROM events ORDER BY id LIMIT 1").fetchone()
            refused = self._db.execute("SELECT COUNT(*) FROM refused").fetchone()[0]
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._totals = (events, size, oldest[0] if oldest else None, refused)

    def _full(self, events: int, size: int, row: int) -> str | None:
        """Why an event of `row` bytes cannot be queued behind `events` of `size` bytes, naming
        the bound and the way out; None if it can."""
        if row > self.max_bytes:  # waiting for NATS would not help
            return (
                f"it is {row} bytes, over outbox_max_bytes={self.max_bytes} "
                f"(GDC_NATS_OUTBOX_MAX_BYTES) of the outbox at {self.path}: raise it to queue "
                "events this large"
            )
        if events + 1 > self.max_events:
            reached = (
                f"{events} events, outbox_max_events={self.max_events} (GDC_NATS_OUTBOX_MAX_EVENTS)"
            )
        elif size + row > self.max_bytes:
            reached = f"{size} bytes, outbox_max_bytes={self.max_bytes} (GDC_NATS_OUTBOX_MAX_BYTES)"
        else:
            return None
        return (
            f"the outbox at {self.path} is full: {reached}. It drains once NATS takes events "
            f"again (`gdc-worker outbox flush --path {self.path}` drains it now), or raise the "
            "bound"
        )

    def _read_totals(self) -> tuple[int, int]:
        row = self._db.execute("SELECT events, bytes FROM totals").fetchone()
        return (row[0], row[1]) if row else (0, 0)


def _settle(future: asyncio.Future[T], result: T, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


async def drain(
    outbox: Outbox,
    publish: Callable[[QueuedEvent], Awaitable[object]],
    progress: Callable[[int], None] | None = None,
) -> int:
    """Publish what `outbox` holds, oldest first, one at a time, until it is empty.

    `publish` waits for JetStream's ack (and raises `PublishError` if there is none): events
    are removed, `DRAIN_BATCH` at a time, only once acked, and `progress` is told how many.
    Returns how many were published; on an error, what is left stays queued, in order.
    """
    sent = 0
    while rows := await outbox.head(DRAIN_BATCH):
        acked: list[int] = []
        try:
            for row in rows:
                await publish(row)
                acked.append(row.id)
        finally:
            if acked:
                with anyio.CancelScope(shield=True):
                    await outbox.remove(acked)
                sent += len(acked)
                if progress is not None:
                    progress(len(acked))
    return sent
