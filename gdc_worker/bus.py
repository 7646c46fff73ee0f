"""The JetStream event bus: connection, streams, consumers, publishing and simple subscriptions.

This module and `pull` are the only ones that talk to nats-py; the worker sees `NATSEventBus`
methods and `Delivery` objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import anyio
import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
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

from .config import NATSConfig
from .errors import (
    ConnectionFailed,
    EventBusError,
    EventDecodeError,
    PublishError,
    SubscriptionError,
)
from .events import Event
from .pull import Delivery, PullConsumer

__all__ = ["EventHandler", "NATSEventBus", "StoredMessage"]

log = logging.getLogger(__name__)

MSG_ID_HEADER = "Nats-Msg-Id"
TRACE_HEADER = "Gdc-Trace-Id"
#: What `publish_event_async` allows in flight before it waits for acks.
MAX_PENDING_PUBLISHES = 4000
#: How long the bus's own subscriptions wait before a failed event comes back.
DEFAULT_NAK_DELAY = 1.0

EventHandler = Callable[[Event], Awaitable[None] | None]
_PATTERN_TOKEN = re.compile(r"^(?:[A-Za-z0-9_-]+|\*|>)$")


def safe_name(text: str) -> str:
    """`text` as a consumer name: '.', '*', '>' and whitespace are not allowed there."""
    return re.sub(r"[\s.]+", "-", text).replace("*", "all").replace(">", "rest")


def event_headers(event: Event, msg_id: str | None = None) -> dict[str, str]:
    """Headers of a published event: the dedup id (the event id by default) and the trace id."""
    headers = {MSG_ID_HEADER: msg_id or event.id}
    if event.trace_id:
        headers[TRACE_HEADER] = event.trace_id
    return headers


def check_pattern(pattern: str) -> str:
    """Validate an event type or pattern (`pin.requested`, `pin.*`, `>`); returns it."""
    tokens = pattern.split(".") if pattern else [""]
    valid = all(_PATTERN_TOKEN.match(t) for t in tokens) and ">" not in tokens[:-1]
    if not valid:
        raise SubscriptionError(
            f"{pattern!r} is not an event type or pattern: use dot-separated names, '*' for one "
            "token or a final '>' for the rest (e.g. 'pin.requested', 'pin.*')"
        )
    return pattern


class _ApiError(msgspec.Struct):
    description: str = "error"


class _PubAckReply(msgspec.Struct):
    error: _ApiError | None = None


_ack_decoder = msgspec.json.Decoder(_PubAckReply)


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


@dataclass(frozen=True)
class _PendingPublish:
    event_id: str
    subject: str


class _Client(NATS):
    """nats-py's client with a cheaper header parser (every event carries two headers).

    nats-py checks each header name for whitespace with a generator over its characters, the
    largest single cost of receiving an event. This does the same check with one `split()`;
    `tests/test_bus.py` compares it with nats-py's own on tricky inputs.
    """

    @staticmethod
    def _parse_header_lines(raw: bytes) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in raw.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            try:
                key = name.strip().decode("ascii")
            except UnicodeDecodeError:
                continue
            if key and key.split() != [key]:  # whitespace inside the name: not a header
                continue
            out[key] = value.strip().decode("utf-8", "replace")
        return out


class NATSEventBus:
    """Publish and consume GDC events on a JetStream stream.

    Create it with `await NATSEventBus.connect(config)`; use it as an async context manager or
    call `close()`.
    """

    def __init__(self, nc: NATS, config: NATSConfig) -> None:
        """Wrap a connected client; prefer `connect()`, which also sets up the stream."""
        self.config = config
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream(timeout=config.connect_timeout)
        self._subscriptions: dict[str, _Subscription] = {}
        self._consumers: set[PullConsumer] = set()
        self._ack_prefix = ""
        self._next_token = 0
        self._pending: dict[str, _PendingPublish] = {}
        self._failed: list[str] = []
        self._drained = asyncio.Event()
        self._drained.set()
        self._window = asyncio.Event()
        self._window.set()
        self._closed = False

    # -- connection ---------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls, config: NATSConfig | None = None, *, name: str | None = None, setup_stream: bool = True
    ) -> NATSEventBus:
        """Connect, then create or update the event stream; raises `ConnectionFailed`.

        `setup_stream=False` leaves the stream as it is, for tools that only read.
        """
        config = config or NATSConfig.from_env()
        holder: list[NATSEventBus] = []
        errors: list[BaseException] = []

        async def disconnected() -> None:
            if holder and not holder[0]._closed:
                log.warning("disconnected from NATS at %s", config.url)

        async def reconnected() -> None:
            log.warning("reconnected to NATS at %s", config.url)
            if holder:
                await holder[0]._on_reconnect()

        async def error(exc: Exception) -> None:
            if not holder:  # the first connect reports its cause from these
                errors.append(exc)
            log.debug("NATS client error: %r", exc)

        async def closed() -> None:
            if holder and not holder[0]._closed:
                # Reconnects are exhausted: nothing will arrive any more. Fail the consumers
                # so the worker exits (and a supervisor restarts it) instead of idling.
                log.error("connection to NATS at %s is closed for good", config.url)
                holder[0]._on_closed()

        nc = _Client()
        try:
            with anyio.fail_after(config.connect_timeout):
                await nc.connect(
                    config.url,
                    name=name,
                    connect_timeout=config.connect_timeout,  # type: ignore[arg-type]  # float works
                    # The first connect fails fast, as the Go client's does: nats-py would
                    # otherwise retry it per the reconnect settings (forever for 0 or -1).
                    allow_reconnect=False,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0,
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                    error_cb=error,
                    closed_cb=closed,
                )
        except (OSError, TimeoutError, nats.errors.Error) as exc:
            await nc.close()
            cause = errors[-1] if errors and not isinstance(exc, OSError) else exc
            raise ConnectionFailed(
                f"cannot connect to NATS at {config.url}: {_describe(cause)}"
            ) from None
        # Once connected, reconnect as configured (nats-py: 0 attempts would mean forever).
        nc.options["allow_reconnect"] = config.max_reconnect_attempts != 0
        nc.options["max_reconnect_attempts"] = config.max_reconnect_attempts
        nc.options["reconnect_time_wait"] = config.reconnect_wait
        bus = cls(nc, config)
        holder.append(bus)
        if not setup_stream:
            return bus
        try:
            await bus.ensure_stream(
                config.stream_name,
                list(config.subjects),
                max_age=config.max_age,
                max_bytes=config.max_bytes,
                max_msgs=config.max_msgs,
                duplicate_window=config.duplicate_window,
            )
        except BaseException:
            await nc.close()
            raise
        return bus

    @property
    def connected(self) -> bool:
        """Whether the client is connected right now."""
        return self._nc.is_connected

    async def close(self) -> None:
        """Stop the subscriptions, wait briefly for async publishes, close. Idempotent.

        Async publishes that failed or got no ack by then are logged (`flush()` first to get
        them as a `PublishError`).
        """
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            for event_type in list(self._subscriptions):
                await self.unsubscribe_from_event_type(event_type)
            for consumer in list(self._consumers):  # e.g. left by a worker that failed to start
                await consumer.close()
            if self._nc.is_connected:
                with anyio.move_on_after(self.config.connect_timeout):
                    await self._drained.wait()
                    with contextlib.suppress(nats.errors.Error):
                        await self._nc.flush()  # acks and naks are plain publishes: send them
            await self._nc.close()
        lost = self._failed + [f"event {p.event_id} to {p.subject}" for p in self._pending.values()]
        if lost:
            log.error("closed with %d async publish(es) not stored: %s", len(lost), "; ".join(lost))

    async def __aenter__(self) -> NATSEventBus:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _on_closed(self) -> None:
        failure = ConnectionFailed(f"the connection to NATS at {self.config.url} was lost")
        for consumer in list(self._consumers):
            consumer.fail(failure)

    async def _on_reconnect(self) -> None:
        # Pull requests die with the connection (nats-py #504/#544): issue them again.
        for consumer in list(self._consumers):
            await consumer.reset()

    # -- streams and consumers ----------------------------------------------------------------

    async def ensure_stream(
        self,
        name: str,
        subjects: list[str],
        *,
        max_age: float,
        max_bytes: int = -1,
        max_msgs: int = -1,
        duplicate_window: float = 120.0,
    ) -> None:
        """Create the stream, or update it to this configuration (file storage, limits)."""
        config = StreamConfig(
            name=name,
            subjects=subjects,
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=max_age,
            max_bytes=max_bytes or -1,
            max_msgs=max_msgs or -1,
            num_replicas=self.config.replicas,
            duplicate_window=duplicate_window,
        )
        try:
            try:
                await self._js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != 10058:  # the name is in use with another configuration
                    raise
                await self._js.update_stream(config)
        except (nats.errors.Error, TimeoutError) as exc:
            raise ConnectionFailed(
                f"cannot set up stream {name} at {self.config.url}: {_describe(exc)}"
            ) from None

    async def ensure_consumer(
        self,
        durable: str,
        filter_subject: str,
        *,
        ack_wait: float = 30.0,
        max_deliver: int = -1,
        max_ack_pending: int = 1000,
        stream: str | None = None,
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
            await self._js.add_consumer(stream or self.config.stream_name, config)
        except (nats.errors.Error, TimeoutError, ValueError) as exc:
            raise SubscriptionError(
                f"cannot create consumer {durable} on {filter_subject}: {_describe(exc)}"
            ) from None

    def pull_consumer(
        self, durable: str, *, capacity: int, stream: str | None = None
    ) -> PullConsumer:
        """Deliveries of an existing durable consumer; the bus re-issues its pulls on reconnect."""
        consumer = PullConsumer(
            self._nc, stream or self.config.stream_name, durable, capacity=capacity
        )
        self._consumers.add(consumer)
        return consumer

    def forget_consumer(self, consumer: PullConsumer) -> None:
        """Stop tracking a consumer returned by `pull_consumer` (after closing it)."""
        self._consumers.discard(consumer)

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
                raise EventBusError(f"cannot read stream {stream}: {_describe(exc)}") from None
            message = _stored(raw)
            yield message
            seq = message.seq + 1

    async def get_message(self, stream: str, seq: int) -> StoredMessage | None:
        """The message at `seq` in `stream`, or None if there is none (or no such stream)."""
        try:
            return _stored(await self._js.get_msg(stream, seq=seq))
        except nats.js.errors.NotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise EventBusError(f"cannot read {stream} #{seq}: {_describe(exc)}") from None

    async def delete_message(self, stream: str, seq: int) -> bool:
        """Remove the message at `seq` from `stream`; False if it was not there."""
        try:
            return await self._js.delete_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            return False
        except (nats.errors.Error, TimeoutError) as exc:
            raise EventBusError(f"cannot delete {stream} #{seq}: {_describe(exc)}") from None

    # -- publishing ---------------------------------------------------------------------------

    async def publish_event(self, event: Event) -> int:
        """Publish and wait for JetStream to store it; returns the stream sequence.

        A duplicate of an event published within the duplicate window is not stored again (the
        sequence of the first is returned).
        """
        subject = self.config.subject_for(event.type)
        return await self.publish_raw(subject, event.to_json(), event_headers(event), what=event.id)

    async def publish_raw(
        self, subject: str, payload: bytes, headers: Mapping[str, str], *, what: str = "message"
    ) -> int:
        """Publish bytes to a stream subject and wait for the ack; returns the stream sequence."""
        try:
            ack = await self._js.publish(
                subject, payload, headers=dict(headers), timeout=self.config.connect_timeout
            )
        except (nats.errors.Error, TimeoutError) as exc:
            raise PublishError(f"publish of {what} to {subject} failed: {_describe(exc)}") from None
        return ack.seq

    async def publish_event_async(self, event: Event) -> None:
        """Publish without waiting for the ack; `flush()` reports the events that failed.

        Waits only when `MAX_PENDING_PUBLISHES` acks are outstanding, and for at most the
        connect timeout: acks that do not come by then count as failed.
        """
        while len(self._pending) >= MAX_PENDING_PUBLISHES:
            self._window.clear()
            with anyio.move_on_after(self.config.connect_timeout):
                await self._window.wait()
            if not self._window.is_set():  # acks lost (a reconnect): count those as failed
                for token in list(self._pending):
                    self._settle_publish(token, "no acknowledgement while the window was full")
        if not self._ack_prefix:
            self._ack_prefix = self._nc.new_inbox() + "."
            await self._nc.subscribe(self._ack_prefix + "*", cb=self._on_publish_ack)
        subject = self.config.subject_for(event.type)
        self._next_token += 1
        token = str(self._next_token)
        self._pending[token] = _PendingPublish(event.id, subject)
        self._drained.clear()
        try:
            await self._nc.publish(
                subject,
                event.to_json(),
                reply=self._ack_prefix + token,
                headers=event_headers(event),
            )
        except nats.errors.Error as exc:
            self._settle_publish(token, _describe(exc))

    async def flush(self, timeout: float | None = None) -> None:
        """Wait for the ack of every async publish; raise one `PublishError` naming the failures.

        Events with no ack within `timeout` (the connect timeout by default) count as failed.
        """
        timeout = self.config.connect_timeout if timeout is None else timeout
        with anyio.move_on_after(timeout):
            await self._drained.wait()
        for token in list(self._pending):
            self._settle_publish(token, f"no acknowledgement within {timeout:g}s")
        failed, self._failed = self._failed, []
        if failed:
            shown = "; ".join(failed[:10]) + (
                f"; and {len(failed) - 10} more" if len(failed) > 10 else ""
            )
            raise PublishError(f"{len(failed)} event(s) were not stored: {shown}")

    async def _on_publish_ack(self, msg: Msg) -> None:
        token = msg.subject[len(self._ack_prefix) :]
        error = None
        if msg.headers and msg.headers.get("Status") == "503":
            error = "no stream listens on the subject"
        else:
            try:
                reply = _ack_decoder.decode(msg.data)
                error = reply.error.description if reply.error is not None else None
            except msgspec.DecodeError:
                error = f"unreadable acknowledgement {msg.data[:80]!r}"
        self._settle_publish(token, error)

    def _settle_publish(self, token: str, error: str | None) -> None:
        pending = self._pending.pop(token, None)
        if pending is None:
            return
        if error is not None:
            self._failed.append(f"event {pending.event_id} to {pending.subject}: {error}")
        if not self._pending:
            self._drained.set()
        self._window.set()

    # -- simple subscriptions -----------------------------------------------------------------

    async def subscribe_to_event_type(
        self, event_type: str, handler: EventHandler, *, durable: str | None = None
    ) -> None:
        """Call `handler` for every event of this type: ack on return, nak (1 s) on exception."""
        await self.subscribe_to_pattern(event_type, handler, durable=durable)

    async def subscribe_to_pattern(
        self, pattern: str, handler: EventHandler, *, durable: str | None = None
    ) -> None:
        """Like `subscribe_to_event_type` for a pattern such as `pin.*` or `>`."""
        check_pattern(str(pattern))
        if not callable(handler):
            raise SubscriptionError(f"handler for {pattern!r} is not callable: {handler!r}")
        if pattern in self._subscriptions:
            raise SubscriptionError(f"already subscribed to {pattern!r} on this bus")
        durable = durable or f"gdc-consumer-{safe_name(pattern)}"
        await self.ensure_consumer(durable, self.config.subject_for(pattern))
        subscription = _Subscription(self, self.pull_consumer(durable, capacity=1), handler)
        await subscription.start()
        self._subscriptions[pattern] = subscription

    async def unsubscribe_from_event_type(self, event_type: str) -> None:
        """Stop the subscription to this type or pattern; its durable consumer stays."""
        subscription = self._subscriptions.pop(event_type, None)
        if subscription is not None:
            await subscription.stop()


class _Subscription:
    """A pull consumer whose deliveries go one at a time to a plain handler."""

    def __init__(self, bus: NATSEventBus, consumer: PullConsumer, handler: EventHandler) -> None:
        self._bus = bus
        self._consumer = consumer
        self._call = as_async(handler)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._consumer.start()
        self._task = asyncio.create_task(self._main())
        self._task.add_done_callback(self._log_failure)

    async def _main(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._consumer.watch)
            while True:
                try:
                    delivery = await self._consumer.next()
                except anyio.EndOfStream:
                    break
                await self._handle(delivery)
                await self._consumer.release(delivery)

    async def _handle(self, delivery: Delivery) -> None:
        name = self._consumer.name
        try:
            event = Event.from_json(delivery.data)
        except EventDecodeError as exc:
            log.error("%s: dropping message %d: %s", name, delivery.stream_seq, exc)
            await delivery.term(str(exc))
            return
        try:
            await self._call(event)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._consumer.hand_back(delivery)
            raise
        except Exception:
            log.exception(
                "%s: handler failed on event %s; retrying in %gs", name, event.id, DEFAULT_NAK_DELAY
            )
            await delivery.nak(DEFAULT_NAK_DELAY)
        else:
            await delivery.ack()

    def _log_failure(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("subscription %s stopped: %s", self._consumer.name, task.exception())

    async def stop(self) -> None:
        await self._consumer.stop()
        if self._task is not None:
            self._task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({self._task})
        await self._consumer.close()
        self._bus.forget_consumer(self._consumer)


def as_async(handler: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    """`handler` as a coroutine function; a plain function runs in a worker thread."""
    if inspect.iscoroutinefunction(handler):
        return handler
    call = getattr(handler, "__call__", None)  # noqa: B004 - an object with an async __call__
    if call is not None and inspect.iscoroutinefunction(call):
        return call  # type: ignore[no-any-return]

    async def in_thread(*args: Any) -> Any:
        # On cancellation (a timeout) stop waiting; the thread itself cannot be interrupted.
        result = await anyio.to_thread.run_sync(handler, *args, abandon_on_cancel=True)
        if inspect.isawaitable(result):  # a plain wrapper around a coroutine function
            result = await result
        return result

    return in_thread


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text and text != name else name
