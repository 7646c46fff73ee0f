"""Following a stream as messages arrive, through an ephemeral ordered consumer.

An ordered consumer is created by the client for itself, lives in memory on one server, and
is re-created from where it was when a message goes missing or its server goes away. It acks
nothing, so no durable consumer, and no other reader, sees a difference.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType

import anyio
import nats.errors
import nats.js.errors
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ..errors import ConnectionFailed, EventBusError
from .state import api_error

__all__ = ["Tail", "TailedMessage", "start_of_last"]

#: How long a probe consumer of `start_of_last` outlives a client that died before deleting it.
_PROBE_INACTIVE_S = 30.0
#: How long a tail waits for a message before it checks that its stream is still the one it
#: started on: the ordered consumer of a deleted stream just stays silent.
CHECK_S = 5.0


@dataclass(frozen=True)
class TailedMessage:
    """A message of the stream, as the tail delivers it."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]
    #: When the stream stored it.
    time: datetime


class Tail:
    """The messages of `stream` on `subject` (a pattern) as they come, from the next one on;
    or first its last `last` ones, or those stored `since` then.

    Use it as an async context manager, then iterate. `EventBusError` when it cannot start.
    """

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        subject: str,
        *,
        last: int = 0,
        since: datetime | None = None,
    ) -> None:
        if last and since is not None:
            raise ValueError("give last or since, not both")
        self._js = js
        self._stream = stream
        self._subject = subject
        self._last = last
        self._since = since
        self._sub: Subscription | None = None
        self._created: datetime | None = None

    async def __aenter__(self) -> Tail:
        what = f"{self._subject} on stream {self._stream}"
        try:
            self._created = (await self._js.stream_info(self._stream)).created
            config = await self._start()
            self._sub = await self._js.subscribe(
                self._subject, stream=self._stream, ordered_consumer=True, config=config
            )
        except nats.js.errors.NotFoundError:
            raise EventBusError(f"cannot follow {what}: there is no such stream") from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise api_error(f"cannot follow {what}", exc) from None
        return self

    async def _start(self) -> ConsumerConfig:
        if self._since is not None:
            return ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=self._since
            )
        if self._last:
            state = (await self._js.stream_info(self._stream)).state
            if state.messages:
                seq = await start_of_last(
                    self._js,
                    self._stream,
                    self._subject,
                    self._last,
                    state.first_seq,
                    state.last_seq,
                )
                return ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=seq
                )
        return ConsumerConfig(deliver_policy=DeliverPolicy.NEW)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sub is not None:
            with anyio.CancelScope(shield=True), contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()

    def __aiter__(self) -> Tail:
        return self

    async def __anext__(self) -> TailedMessage:
        if self._sub is None:
            raise RuntimeError("enter the Tail (async with) before iterating it")
        while True:
            try:
                msg = await self._sub.next_msg(timeout=CHECK_S)
                break
            except nats.errors.TimeoutError:
                await self._check_stream()
            except nats.errors.ConnectionClosedError:
                raise ConnectionFailed("the connection to NATS was closed") from None
        meta = msg.metadata
        return TailedMessage(
            seq=meta.sequence.stream,
            subject=msg.subject,
            data=msg.data,
            headers=msg.headers or {},
            time=meta.timestamp,
        )

    async def _check_stream(self) -> None:
        """Raise `EventBusError` if the stream was deleted (and maybe created again) since
        the tail started: nothing would ever come, and nothing would say why."""
        gone = EventBusError(f"stream {self._stream} was deleted while tail followed it")
        try:
            created = (await self._js.stream_info(self._stream)).created
        except nats.js.errors.NotFoundError:
            raise gone from None
        except (nats.errors.Error, TimeoutError):
            return  # a server slow to answer: the ordered consumer copes, or the next check
        if created != self._created:  # created again since: from sequence 1, unseen
            raise gone


async def start_of_last(
    js: JetStreamContext, stream: str, subject: str, count: int, first: int, last: int
) -> int:
    """The sequence from which `stream` (holding `first`..`last`) has its last `count`
    messages on `subject`; `first` when it has fewer.

    A binary search over start sequences, each probe a consumer whose `num_pending` says how
    many messages match from there on: about 2 log2(last - first) requests, none of them
    reading a message.
    """
    if await _matching_from(js, stream, subject, first) <= count:
        return first
    low, high = first, last  # matching_from(low) > count; find the largest start with >= count
    while low < high:
        middle = (low + high + 1) // 2
        if await _matching_from(js, stream, subject, middle) >= count:
            low = middle
        else:
            high = middle - 1
    return low


async def _matching_from(js: JetStreamContext, stream: str, subject: str, seq: int) -> int:
    """How many messages of `stream` on `subject` are at `seq` or later (nats-py's errors as
    they are: the tail says what it could not follow)."""
    probe = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=seq,
        filter_subject=subject,
        ack_policy=AckPolicy.NONE,
        inactive_threshold=_PROBE_INACTIVE_S,
        mem_storage=True,
        num_replicas=1,
    )
    info = await js.add_consumer(stream, probe)
    with anyio.CancelScope(shield=True), contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_consumer(stream, info.name)
    return info.num_pending or 0
