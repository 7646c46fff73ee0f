"""The dead-letter stream: what a worker records when it gives up, and what operators do with it.

Each record is one message on `<dlq_subject_prefix>.<consumer>.<event type>` (`.invalid` when the
message was not an event) in the `dlq_stream_name` stream; its stream sequence is its id.
"""

from __future__ import annotations

import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import msgspec

from .errors import DeadLetterNotFound, DeadLetterUnreadable, EventDecodeError, message_of
from .events import MSG_ID_HEADER, Event
from .subjects import is_event_type, safe_name

if TYPE_CHECKING:
    from .bus import NATSEventBus
    from .bus.pull import Delivery

__all__ = ["DeadLetterEntry", "DeadLetterQueue", "DeadLetterRecord"]

INVALID_TYPE = "invalid"


class DeadLetterRecord(msgspec.Struct, kw_only=True):
    """Why and when a message was given up, with the message as it was delivered."""

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
    data: bytes
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    event: Event | None = None

    @property
    def event_type(self) -> str:
        """The event's type, or `invalid` when the message did not decode as an event."""
        return self.event.type if self.event is not None else INVALID_TYPE


_record_decoder = msgspec.json.Decoder(DeadLetterRecord)


def _entry(stream: str, seq: int, data: bytes) -> DeadLetterEntry:
    try:
        return DeadLetterEntry(seq, _record_decoder.decode(data))
    except msgspec.DecodeError as exc:
        raise DeadLetterUnreadable(f"{stream} #{seq} is not a dead-letter record: {exc}") from None


@dataclass(frozen=True)
class DeadLetterEntry:
    """A record and its id (its sequence in the dead-letter stream)."""

    id: int
    record: DeadLetterRecord


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
            self.stream,
            [f"{self.prefix}.>"],
            max_age=config.dlq_max_age,
            duplicate_window=min(config.duplicate_window, config.dlq_max_age or float("inf")),
        )

    async def record(
        self,
        *,
        reason: str,
        consumer: str,
        handler: str,
        delivery: Delivery,
        error: BaseException | None,
    ) -> int:
        """Store a record and wait for the ack; returns its id.

        Its message id is `<stream>:<seq>:<consumer>`, so the same failure recorded twice (a
        worker that died between recording and terminating) is stored once within the
        duplicate window, while two consumers failing the same event get a record each.
        """
        stream, stream_seq, subject = delivery.stream, delivery.stream_seq, delivery.subject
        try:
            event: Event | None = Event.from_json(delivery.data)
        except EventDecodeError:
            event = None
        record = DeadLetterRecord(
            failed_at=datetime.now(UTC),
            reason=reason,
            consumer=consumer,
            handler=handler,
            stream=stream,
            stream_seq=stream_seq,
            subject=subject,
            deliveries=delivery.deliveries,
            error_type=type(error).__name__ if error is not None else "",
            error_message=message_of(error) if error is not None else "",
            traceback=_traceback(error),
            data=delivery.data,
            headers=dict(delivery.headers),
            event=event,
        )
        event_type = event.type if event is not None else INVALID_TYPE
        if not is_event_type(event_type):
            event_type = INVALID_TYPE  # a type that is no subject would make the record unstorable
        subject_out = f"{self.prefix}.{safe_name(consumer)}.{event_type}"
        msg_id = {MSG_ID_HEADER: f"{stream}:{stream_seq}:{consumer}"}
        return await self._bus.publish_raw(
            subject_out, msgspec.json.encode(record), msg_id, what=f"dead letter of {subject}"
        )

    async def entries(
        self,
        *,
        event_type: str | None = None,
        consumer: str | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[DeadLetterEntry]:
        """Records in id order, optionally only of one event type and/or consumer."""
        subject = f"{self.prefix}.{consumer or '*'}.{event_type or '>'}"
        count = 0
        async for message in self._bus.stream_messages(self.stream, subject):
            if limit is not None and count >= limit:
                return
            count += 1
            yield _entry(self.stream, message.seq, message.data)

    async def get(self, entry_id: int) -> DeadLetterEntry:
        """One record by id; raises `DeadLetterNotFound`."""
        message = await self._bus.get_message(self.stream, entry_id)  # None: no such stream too
        if message is None:
            raise DeadLetterNotFound(f"no dead letter with id {entry_id} in {self.stream}")
        return _entry(self.stream, message.seq, message.data)

    async def replay(self, entry_id: int) -> DeadLetterEntry:
        """Publish the original message again on its subject, then remove the record.

        The message keeps its bytes (and so the event its id) but gets a new `Nats-Msg-Id`,
        so the event stream does not drop it as a duplicate inside its window.
        """
        entry = await self.get(entry_id)
        record = entry.record
        headers = dict(record.headers)
        original = headers.get(MSG_ID_HEADER) or f"{record.stream}:{record.stream_seq}"
        headers[MSG_ID_HEADER] = f"{original}:replay:{self.stream}:{entry_id}"
        await self._bus.publish_raw(
            record.subject, record.data, headers, what=f"replay of dead letter {entry_id}"
        )
        await self._bus.delete_message(self.stream, entry_id)
        return entry

    async def purge(self, entry_id: int) -> None:
        """Delete one record; raises `DeadLetterNotFound`."""
        await self.get(entry_id)  # the server's answer for a missing sequence varies
        if not await self._bus.delete_message(self.stream, entry_id):
            raise DeadLetterNotFound(f"no dead letter with id {entry_id} in {self.stream}")


def _traceback(error: BaseException | None) -> str:
    # format_exception survives an exception whose __str__ raises ("<exception str() failed>").
    return "".join(traceback.format_exception(error)) if error is not None else ""
