"""Streams and consumers: ensure them, and read or delete stored messages by sequence."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RawStreamMsg,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from ..errors import ConfigError, ConnectionFailed, EventBusError, SubscriptionError, describe

__all__ = ["Admin", "StoredMessage"]

_STREAM_NAME_IN_USE = 10058


@dataclass(frozen=True)
class StoredMessage:
    """A message as a stream keeps it."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]


def _stored(raw: RawStreamMsg) -> StoredMessage:
    return StoredMessage(
        seq=raw.seq or 0, subject=raw.subject or "", data=raw.data or b"", headers=raw.headers or {}
    )


class Admin:
    """JetStream's management API as gdc-worker uses it; errors are `EventBusError`s."""

    def __init__(self, js: JetStreamContext, url: str) -> None:
        self._js = js
        self._url = url

    async def ensure_stream(
        self,
        name: str,
        subjects: list[str],
        *,
        max_age: float,
        max_bytes: int = -1,
        max_msgs: int = -1,
        duplicate_window: float = 120.0,
        replicas: int = 1,
    ) -> None:
        """Create the stream, or update its limits to this configuration.

        A stream that exists keeps any subjects it has beyond ours; one that lacks a subject we
        need, or has another retention or storage, is never reshaped: that raises
        `ConfigError`, since it belongs to something else.
        """
        config = StreamConfig(
            name=name,
            subjects=subjects,
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=max_age,
            max_bytes=max_bytes or -1,
            max_msgs=max_msgs or -1,
            num_replicas=replicas,
            duplicate_window=duplicate_window,
        )
        try:
            try:
                await self._js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _STREAM_NAME_IN_USE:
                    raise
                current = (await self._js.stream_info(name)).config
                _check_same_shape(current, config)
                config.subjects = current.subjects
                await self._js.update_stream(config)
        except (nats.errors.Error, TimeoutError) as exc:
            raise ConnectionFailed(
                f"cannot set up stream {name} at {self._url}: {describe(exc)}"
            ) from None

    async def ensure_consumer(
        self,
        stream: str,
        durable: str,
        filter_subject: str,
        *,
        ack_wait: float = 30.0,
        max_deliver: int = -1,
        max_ack_pending: int = 1000,
    ) -> None:
        """Create the durable pull consumer, or update it to this configuration."""
        config = ConsumerConfig(
            name=durable,
            durable_name=durable,
            filter_subject=filter_subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
            max_ack_pending=max_ack_pending,
        )
        try:
            await self._js.add_consumer(stream, config)
        except (nats.errors.Error, TimeoutError, ValueError) as exc:
            raise SubscriptionError(
                f"cannot create consumer {durable} on {filter_subject}: {describe(exc)}"
            ) from None

    async def stream_messages(
        self, stream: str, subject: str | None = None, start_seq: int = 1
    ) -> AsyncIterator[StoredMessage]:
        """The messages stored in `stream` (only those on `subject`, a pattern, if given).

        None at all when the stream does not exist.
        """
        seq = start_seq
        while True:
            try:
                raw = await self._js.get_msg(stream, seq=seq, subject=subject or ">", next=True)
            except nats.js.errors.NotFoundError:
                return
            except (nats.errors.Error, TimeoutError) as exc:
                raise EventBusError(f"cannot read stream {stream}: {describe(exc)}") from None
            message = _stored(raw)
            yield message
            seq = message.seq + 1

    async def get_message(self, stream: str, seq: int) -> StoredMessage | None:
        """The message at `seq` in `stream`, or None if there is none (or no such stream)."""
        if seq < 1:
            return None  # the server answers a bad request, not "not found"
        try:
            return _stored(await self._js.get_msg(stream, seq=seq))
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise EventBusError(f"cannot read {stream} #{seq}: {describe(exc)}") from None

    async def delete_message(self, stream: str, seq: int) -> bool:
        """Remove the message at `seq` from `stream`; False if it was not there."""
        if seq < 1:
            return False
        try:
            return await self._js.delete_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            return False
        except (nats.errors.Error, TimeoutError) as exc:
            raise EventBusError(f"cannot delete {stream} #{seq}: {describe(exc)}") from None


def _check_same_shape(current: StreamConfig, wanted: StreamConfig) -> None:
    """Refuse to turn an existing stream into another one: only its limits may change."""
    missing = sorted(set(wanted.subjects or []) - set(current.subjects or []))
    differences = [f"subjects {current.subjects} (without {', '.join(missing)})"] if missing else []
    differences += [
        f"{name} {theirs.value!r} (we need {ours.value!r})"
        for name, theirs, ours in (
            ("retention", current.retention, wanted.retention),
            ("storage", current.storage, wanted.storage),
        )
        if theirs is not None and ours is not None and theirs != ours
    ]
    if differences:
        raise ConfigError(
            f"stream {wanted.name} exists with other {', '.join(differences)}; gdc-worker does "
            "not reshape a stream it does not own: use another stream name, or change the "
            "stream yourself"
        )
