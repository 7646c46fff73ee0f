"""What a stream and its consumers hold right now: counts, ages and lag, from JetStream's API.

Everything is read through the JetStream API (`$JS.API.STREAM.INFO`, `CONSUMER.INFO`,
`STREAM.MSG.GET`), which in a cluster the stream's or the consumer's leader answers; a
follower's view (`/jsz`) can hold a stale `num_pending`. The answers are decoded here rather
than through nats-py's types, which leave out the stream's first and last times and a
consumer's last activity.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS

from ..errors import ConnectionFailed, EventBusError, describe
from .connection import RequestRefused

__all__ = [
    "ConsumerState",
    "StateReader",
    "StreamLimits",
    "StreamState",
    "api_error",
    "permission_denied",
]

_API = "$JS.API"
_STREAM_NOT_FOUND = 10059
_CONSUMER_NOT_FOUND = 10014
_NO_MESSAGE_FOUND = 10037
#: The JetStream API's status when JetStream is not there for this connection: disabled for
#: the account, or a cluster without a meta leader.
_UNAVAILABLE = 503

T = TypeVar("T")


@dataclass(frozen=True)
class StreamLimits:
    """A stream's limits; 0 for one that is not set."""

    max_msgs: int
    max_bytes: int
    #: Seconds.
    max_age: float


@dataclass(frozen=True)
class StreamState:
    """A stream as its leader sees it now."""

    name: str
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    #: When the first (oldest) and last stored messages were stored; None when it is empty.
    first_ts: datetime | None
    last_ts: datetime | None
    limits: StreamLimits
    replicas: int
    #: The server leading the stream in a cluster; None on a single server.
    leader: str | None

    def use(self, now: datetime | None = None) -> dict[str, float]:
        """How much of each limit that is set the stream uses, in %: `max_msgs`, `max_bytes`,
        and `max_age` (the age of its oldest message)."""
        limits, used = self.limits, {}
        if limits.max_msgs:
            used["max_msgs"] = 100.0 * self.messages / limits.max_msgs
        if limits.max_bytes:
            used["max_bytes"] = 100.0 * self.bytes / limits.max_bytes
        if limits.max_age:
            age = _age_s(self.first_ts, now) if self.first_ts else 0.0
            used["max_age"] = 100.0 * age / limits.max_age
        return used


@dataclass(frozen=True)
class ConsumerState:
    """A durable consumer as its leader sees it now."""

    name: str
    #: The subjects it delivers; empty: every subject of the stream.
    filters: tuple[str, ...]
    #: Messages matching its filter that it has not delivered yet (`num_pending`).
    pending: int
    #: Messages delivered and not acked yet (in flight, or nak'd and waiting for redelivery).
    ack_pending: int
    redelivered: int
    #: Pull requests waiting for messages.
    waiting: int
    #: Its last delivery or ack, whichever came later; None if it never did either.
    last_active: datetime | None
    #: Paused by an operator (nats-server 2.11+; always False on 2.10).
    paused: bool
    #: Age in seconds of the oldest message it has not acked (pending or in flight); 0 if none.
    oldest_unacked_age_s: float

    @property
    def lag(self) -> int:
        """What is left to do: pending + ack pending, as KEDA's JetStream scaler counts it."""
        return self.pending + self.ack_pending


class _Error(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _Cluster(msgspec.Struct):
    leader: str | None = None


class _StreamConfig(msgspec.Struct):
    max_msgs: int = -1
    max_bytes: int = -1
    max_age: int = 0  # nanoseconds
    num_replicas: int = 1


class _StreamCounts(msgspec.Struct):
    messages: int = 0
    bytes: int = 0
    first_seq: int = 0
    last_seq: int = 0
    first_ts: datetime | None = None
    last_ts: datetime | None = None
    subjects: dict[str, int] | None = None


class _StreamInfo(msgspec.Struct):
    config: _StreamConfig = msgspec.field(default_factory=_StreamConfig)
    state: _StreamCounts = msgspec.field(default_factory=_StreamCounts)
    cluster: _Cluster | None = None
    #: With `subjects_filter`: how many subjects match in all (the answer comes in pages).
    total: int = 0


class _ConsumerConfig(msgspec.Struct):
    durable_name: str = ""
    filter_subject: str = ""
    filter_subjects: list[str] | None = None


class _Sequence(msgspec.Struct):
    stream_seq: int = 0
    last_active: datetime | None = None


class _ConsumerInfo(msgspec.Struct):
    name: str
    config: _ConsumerConfig = msgspec.field(default_factory=_ConsumerConfig)
    delivered: _Sequence = msgspec.field(default_factory=_Sequence)
    ack_floor: _Sequence = msgspec.field(default_factory=_Sequence)
    num_pending: int = 0
    num_ack_pending: int = 0
    num_redelivered: int = 0
    num_waiting: int = 0
    paused: bool = False


class _Names(msgspec.Struct):
    consumers: list[str] | None = None
    total: int = 0


class _StoredTime(msgspec.Struct):
    time: datetime


class _Message(msgspec.Struct):
    message: _StoredTime


class _Reply(msgspec.Struct):
    error: _Error | None = None


_reply_decoder = msgspec.json.Decoder(_Reply)


class StateReader:
    """Reads stream and consumer state over a connected client; errors are `EventBusError`s."""

    def __init__(self, nc: NATS, timeout: float) -> None:
        self._nc = nc
        self._timeout = timeout

    async def stream_state(self, stream: str) -> StreamState | None:
        """The stream's counts, times and limits; None if there is no such stream."""
        info = await self._request(f"STREAM.INFO.{stream}", _StreamInfo, _STREAM_NOT_FOUND)
        if info is None:
            return None
        state, config = info.state, info.config
        return StreamState(
            name=stream,
            messages=state.messages,
            bytes=state.bytes,
            first_seq=state.first_seq,
            last_seq=state.last_seq,
            first_ts=_time(state.first_ts) if state.messages else None,
            last_ts=_time(state.last_ts) if state.messages else None,
            limits=StreamLimits(
                max_msgs=max(config.max_msgs, 0),
                max_bytes=max(config.max_bytes, 0),
                max_age=max(config.max_age, 0) / 1e9,
            ),
            replicas=config.num_replicas or 1,
            leader=info.cluster.leader if info.cluster else None,
        )

    async def subject_counts(self, stream: str, subjects: str) -> dict[str, int]:
        """How many messages `stream` holds on each subject matching `subjects` (a pattern),
        without reading them; empty if there is no such stream."""
        counts: dict[str, int] = {}
        while True:
            body = {"subjects_filter": subjects, "offset": len(counts)}
            info = await self._request(
                f"STREAM.INFO.{stream}", _StreamInfo, _STREAM_NOT_FOUND, body
            )
            page = (info.state.subjects or {}) if info else {}
            counts.update(page)
            if info is None or not page or len(counts) >= info.total:
                return counts

    async def consumer_names(self, stream: str) -> list[str]:
        """The names of the stream's consumers, ephemeral ones included; none for no stream."""
        names: list[str] = []
        while True:
            page = await self._request(
                f"CONSUMER.NAMES.{stream}", _Names, _STREAM_NOT_FOUND, {"offset": len(names)}
            )
            found = (page.consumers or []) if page else []
            names += found
            if page is None or not found or len(names) >= page.total:
                return sorted(names)

    async def consumer_state(self, stream: str, name: str) -> ConsumerState | None:
        """One consumer's state, as its leader answers; None if it (or the stream) is gone."""
        info = await self._consumer_info(stream, name)
        return await self._state(stream, info) if info is not None else None

    async def consumer_states(self, stream: str) -> list[ConsumerState]:
        """The state of each durable consumer of the stream, by name; ephemeral consumers (a
        `tail`, another tool's) are left out. Empty when there is no such stream."""
        states = []
        for name in await self.consumer_names(stream):
            info = await self._consumer_info(stream, name)
            if info is not None and info.config.durable_name:
                states.append(await self._state(stream, info))
        return states

    async def _consumer_info(self, stream: str, name: str) -> _ConsumerInfo | None:
        return await self._request(
            f"CONSUMER.INFO.{stream}.{name}",
            _ConsumerInfo,
            _CONSUMER_NOT_FOUND,
            not_found_too=_STREAM_NOT_FOUND,
        )

    async def _state(self, stream: str, info: _ConsumerInfo) -> ConsumerState:
        config = info.config
        filters = tuple(config.filter_subjects or [])
        if not filters and config.filter_subject:
            filters = (config.filter_subject,)
        oldest = None
        if info.num_pending or info.num_ack_pending:
            oldest = await self._oldest_unacked(stream, info.ack_floor.stream_seq, filters)
        active = [t for t in (info.delivered.last_active, info.ack_floor.last_active) if t]
        return ConsumerState(
            name=info.name,
            filters=filters,
            pending=info.num_pending,
            ack_pending=info.num_ack_pending,
            redelivered=info.num_redelivered,
            waiting=info.num_waiting,
            last_active=_time(max(active)) if active else None,
            paused=info.paused,
            oldest_unacked_age_s=_age_s(oldest) if oldest else 0.0,
        )

    async def _oldest_unacked(
        self, stream: str, ack_floor: int, filters: tuple[str, ...]
    ) -> datetime | None:
        """When the first message past the ack floor on any of `filters` was stored."""
        times = []
        for subject in filters or (">",):
            found = await self._request(
                f"STREAM.MSG.GET.{stream}",
                _Message,
                _NO_MESSAGE_FOUND,
                {"seq": ack_floor + 1, "next_by_subj": subject},
                not_found_too=_STREAM_NOT_FOUND,
            )
            if found is not None:
                times.append(found.message.time)
        return min(times) if times else None

    async def _request(
        self,
        api: str,
        answer: type[T],
        not_found: int,
        body: dict[str, Any] | None = None,
        not_found_too: int | None = None,
    ) -> T | None:
        """Ask the JetStream API; None when it answers with `not_found` (or `not_found_too`)."""
        payload = msgspec.json.encode(body) if body is not None else b""
        try:
            reply = await self._nc.request(f"{_API}.{api}", payload, timeout=self._timeout)
            error = _reply_decoder.decode(reply.data).error
            if error is not None and error.err_code in (not_found, not_found_too):
                return None
            if error is not None:
                kind = ConnectionFailed if error.code == _UNAVAILABLE else EventBusError
                raise kind(f"cannot read {api}: {error.description} ({error.err_code})")
            return msgspec.json.decode(reply.data, type=answer)
        except (nats.errors.Error, TimeoutError, msgspec.DecodeError) as exc:
            raise api_error(f"cannot read {api}", exc) from None


def api_error(
    what: str, exc: BaseException, *, otherwise: type[EventBusError] = EventBusError
) -> EventBusError:
    """The error for a JetStream API request about `what` that failed with `exc`:
    `ConnectionFailed` when JetStream is not there (a server run without it answers nobody,
    an account without it 503), so that commands exit 4 as for a server out of reach; an
    `EventBusError` saying so when the server refused the request for want of permission;
    else `otherwise`, saying what nats-py said."""
    denied = permission_denied(exc)
    if denied:
        return EventBusError(f"{what}: {denied}")
    if isinstance(exc, nats.errors.NoRespondersError) or (
        isinstance(exc, nats.js.errors.ServiceUnavailableError) and not exc.description
    ):
        return ConnectionFailed(f"{what}: JetStream is not enabled on this NATS server")
    if isinstance(exc, nats.js.errors.ServiceUnavailableError):
        return ConnectionFailed(f"{what}: {exc.description} ({exc.err_code})")
    return otherwise(f"{what}: {describe(exc)}")


def permission_denied(failure: BaseException) -> str:
    """Why a request that ended in `failure` failed, if the server refused this client that
    publish for want of permission (`permission denied: the server says permissions violation
    for publish to "$js.api..."`); "" if not."""
    return str(failure) if isinstance(failure, RequestRefused) else ""


def _time(value: datetime | None) -> datetime | None:
    """A server time, None for Go's zero time (year 1), which means "never"."""
    return value if value is not None and value.year > 1 else None


def _age_s(since: datetime, now: datetime | None = None) -> float:
    return max(0.0, ((now or datetime.now(UTC)) - since).total_seconds())
