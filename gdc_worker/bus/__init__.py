"""The JetStream transport, the only code that talks to nats-py, behind `NATSEventBus`.

- `connection`: the first connect, reconnects, and what the bus hears about them;
- `admin`: streams and consumers, stored messages by sequence;
- `publish`: one publish waiting for its ack, and the window of async publishes;
- `relay`: publishing through the outbox while JetStream cannot take events, and draining it;
- `pull`: pull consumers and the `Delivery` the runner settles.

`NATSEventBus` is a thin facade over them with the Go bus's API. Its subscriptions run on the
worker's `HandlerRunner`, so they have the worker's guarantees: retries, backoff, dead letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from datetime import datetime
from types import TracebackType

import anyio
import nats.errors

from ..app import HandlerFunc, HandlerOptions, PendingPublish, handler_spec
from ..config import NATSConfig, redact_url
from ..errors import (
    ConnectionFailed,
    GDCWorkerError,
    PublishError,
    PublishRefused,
    SubscriptionError,
    message_of,
)
from ..events import Event, event_headers
from ..hooks import Hook, Hooks
from ..outbox import Outbox
from ..retry import DEFAULT_BACKOFF, DEFAULT_RETRY, RetryPolicy
from ..subjects import check_event_type, safe_name
from .admin import Admin, BoundConsumer, LimitChange, StoredMessage, StreamSpec
from .connection import Client, ConnectionEvents, connect
from .publish import TRY_TIMEOUT_S, AckCallback, AsyncPublishWindow, Stored, publish
from .pull import Delivery, PullConsumer
from .relay import Relay
from .scan import count_messages, scan_messages
from .state import ConsumerState, StateReader, StreamLimits, StreamState
from .subscriptions import Subscriptions
from .tail import Tail, TailedMessage

__all__ = [
    "BoundConsumer",
    "ConsumerState",
    "Delivery",
    "EventHandler",
    "LimitChange",
    "NATSEventBus",
    "PullConsumer",
    "StoredMessage",
    "StreamLimits",
    "StreamSpec",
    "StreamState",
    "Tail",
    "TailedMessage",
]

log = logging.getLogger(__name__)

EventHandler = HandlerFunc
#: How many event types' subjects a bus keeps (GDC has 17; a bound for types made up at run time).
_MAX_EVENT_TYPES = 1024


class NATSEventBus:
    """Publish and consume GDC events on a JetStream stream.

    Create it with `await NATSEventBus.connect(config)`; use it as an async context manager or
    call `close()`. Its `hooks` see every event publish and the connection's drops.
    With `config.outbox_path`, events that JetStream cannot take wait in an outbox (see
    `gdc_worker.outbox`) and the bus connects in the background when NATS is unreachable.
    """

    def __init__(
        self,
        nc: Client,
        config: NATSConfig,
        events: ConnectionEvents,
        hooks: Hooks | None = None,
        outbox: Outbox | None = None,
    ) -> None:
        """Wrap a client; use `connect()`, which also sets up the stream (and the outbox)."""
        self.config = config
        self.hooks = hooks or Hooks()
        self._nc = nc
        self._events = events
        js = nc.jetstream(timeout=config.connect_timeout)
        self._js = js
        self._subject_prefix = config.subject_prefix
        self._subjects: dict[str, str] = {}  # event type -> subject, see `_subject_of`
        self._admin = Admin(nc, js, redact_url(config.url), timeout=config.connect_timeout)
        self._state = StateReader(nc, timeout=config.connect_timeout)
        self._relay = Relay(outbox, nc, js, config) if outbox is not None else None
        self._window = AsyncPublishWindow(
            nc,
            timeout=config.connect_timeout,
            requeue=self._relay,
        )
        # The first try of each publish that waits for its ack: no timer of its own per message.
        self._first_tries = AsyncPublishWindow(nc, timeout=TRY_TIMEOUT_S)
        self._consumers: set[PullConsumer] = set()
        self._subscriptions = Subscriptions(self)
        self._closed = False
        self._last_server = redact_url(config.url)
        events.on_reconnect = self._on_reconnect
        events.on_lost = self._on_lost
        events.on_change = self._on_change
        events.server = lambda: self.server_url

    @classmethod
    async def connect(
        cls,
        config: NATSConfig | None = None,
        *,
        name: str | None = None,
        setup_stream: bool = True,
        hooks: Sequence[Hook] | Hooks = (),
    ) -> NATSEventBus:
        """Connect, then set the event stream up as `config.stream_setup` says.

        `create` (the default) creates a missing stream and keeps the limits of one that exists
        (one warning names those that differ), `update` updates them to the configuration (as
        the Go bus does), `none` requires the stream to exist. Raises `ConnectionFailed`, or
        `ConfigError` for a stream of another shape (or a missing one under `none`).
        `setup_stream=False` does not look at the stream at all, for tools that only read.

        With `config.outbox_path` (and `setup_stream`), the outbox is opened first (a path
        that cannot be used raises `ConfigError`); then, when no server answers, this returns
        at once: the bus connects and sets the stream up in the background, and publishes
        wait in the outbox meanwhile. `wait_connected()` waits for it.
        """
        config = config or NATSConfig.from_env()
        events = ConnectionEvents(redact_url(config.url))
        hooks = hooks if isinstance(hooks, Hooks) else Hooks(hooks)
        outbox = None
        if config.outbox_path and setup_stream:
            outbox = await Outbox.open(
                config.outbox_path,
                max_events=config.outbox_max_events,
                max_bytes=config.outbox_max_bytes,
            )
        try:
            nc = await connect(config, events, name, keep_trying=outbox is not None)
        except BaseException:
            if outbox is not None:
                await outbox.close()
            raise
        bus = cls(nc, config, events, hooks, outbox)
        try:
            if setup_stream and events.connecting is None:
                await bus.ensure_stream(bus.event_stream, setup=config.stream_setup)
        except BaseException:
            await bus.close()
            raise
        if bus._relay is not None:
            bus._relay.start(events.connecting, bus._connected_later)
        return bus

    async def _connected_later(self) -> None:
        """The background connect is done: tell the hooks, set the stream up."""
        log.warning("connected to NATS at %s", self.server_url)
        self._on_change(True)
        await self.ensure_stream(self.event_stream, setup=self.config.stream_setup)

    async def wait_connected(self) -> None:
        """Wait until the bus is connected and the stream is set up (at once without an
        outbox: `connect()` did both); raises the `ConfigError` that keeps the stream from
        being set up in the background."""
        if self._relay is not None:
            await self._relay.wait_ready()

    @property
    def outbox(self) -> Outbox | None:
        """The outbox (`config.outbox_path`), for its `stats()`; None without one."""
        return self._relay.outbox if self._relay is not None else None

    async def drain_outbox(
        self,
        outbox: Outbox,
        progress: Callable[[int], None] | None = None,
        refused: Callable[[str], None] | None = None,
    ) -> int:
        """Publish what `outbox` holds now as the relay of a bus with that outbox does, from a
        bus without one (`gdc-worker outbox flush`); returns how many. See `Relay.drain`."""
        return await Relay(outbox, self._nc, self._js, self.config).drain(progress, refused)

    async def wait_outbox_empty(self) -> None:
        """Wait until every event queued in the outbox is stored in JetStream (at once
        without an outbox)."""
        if self._relay is not None:
            await self._relay.wait_empty()

    @property
    def connected(self) -> bool:
        """Whether the client is connected right now."""
        return self._nc.is_connected

    @property
    def max_payload(self) -> int:
        """The largest message the server takes, headers and payload together (bytes)."""
        return self._nc.max_payload

    @property
    def server_url(self) -> str:
        """The server the client is connected to now, else the last one (password hidden)."""
        current = self._nc.connected_url
        if current is not None:
            self._last_server = redact_url(current.geturl())
        return self._last_server

    async def close(self, timeout: float | None = None) -> None:
        """Stop the subscriptions, wait briefly for async publishes, close. Idempotent.

        Waits on the server (for the async publishes' acks, then for the last acks and naks to
        be taken) up to `timeout` in all, `connect_timeout` by default. Async publishes that
        failed or got no ack by then are logged (`flush()` first to get them as a
        `PublishError`); with an outbox, they are queued in it. A subscription that failed is
        raised here (see `subscribe_to_pattern`).
        """
        if self._closed:
            return
        self._closed = True
        self._events.closing = True
        end = time.monotonic() + (self.config.connect_timeout if timeout is None else timeout)

        def left() -> float:
            return max(0.0, end - time.monotonic())

        with anyio.CancelScope(shield=True):
            failure = await self._subscriptions.close()
            for consumer in list(self._consumers):  # e.g. left by a worker that failed to start
                await consumer.close(left())
            if self._relay is not None:
                await self._close_relay(self._relay, left() if self._nc.is_connected else 0.0)
            elif self._nc.is_connected:
                await self._window.wait_drained(left())
            await self._window.close()
            await self._first_tries.close()
            if self._nc.is_connected:
                with contextlib.suppress(nats.errors.Error), anyio.move_on_after(left()):
                    await self._nc.flush()  # acks and naks are plain publishes: send them
            await self._nc.close()
        lost = self._window.unsettled()
        if lost:
            log.error("closed with %d async publish(es) not stored: %s", len(lost), "; ".join(lost))
        if failure is not None:
            raise failure

    async def __aenter__(self) -> NATSEventBus:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _close_relay(self, relay: Relay, timeout: float) -> None:
        """Wait up to `timeout` for the async publishes' acks, queue in the outbox those still
        without one, then close it."""
        try:
            await self._window.flush(timeout)
        except PublishError as exc:
            log.error("closed with async publishes not stored: %s", exc)
        if self._events.connecting is not None:
            self._events.connecting.cancel()
        await relay.close()

    def _on_lost(self) -> None:
        failure = ConnectionFailed(f"the connection to NATS at {self.server_url} was lost")
        for consumer in list(self._consumers):
            consumer.fail(failure)

    def _on_change(self, connected: bool) -> None:
        self.hooks.run("connection_changed", connected)

    async def _on_reconnect(self) -> None:
        # Pull requests die with the connection (nats-py #504/#544): issue them again.
        for consumer in list(self._consumers):
            await consumer.reset()

    # -- streams and consumers ----------------------------------------------------------------

    @property
    def event_stream(self) -> StreamSpec:
        """The event stream as the configuration describes it."""
        return StreamSpec.of(self.config)

    async def ensure_stream(self, spec: StreamSpec, setup: str = "update") -> None:
        """Set up a stream: `setup` is what may be done to it (`update`, `create` or `none`,
        as `NATSConfig.stream_setup`). A stream of that name with another shape raises
        `ConfigError` (see `Admin`)."""
        await self._admin.ensure_stream(spec, setup)

    async def stream_changes(self) -> list[LimitChange] | None:
        """The limits of the event stream that differ from the configuration; None: no stream.

        What `stream_setup="update"` (or `apply_stream()`) would change. Raises `ConfigError`
        for a stream of another shape.
        """
        return await self._admin.stream_changes(self.event_stream)

    async def apply_stream(self) -> None:
        """Create the event stream, or update its limits to the configuration."""
        await self.ensure_stream(self.event_stream, setup="update")

    async def leader(self, stream: str, durable: str | None = None) -> str | None:
        """The server leading `stream` (or its consumer `durable`) in a cluster; see `Admin`."""
        return await self._admin.leader(stream, durable)

    async def step_down(
        self, stream: str, durable: str | None = None, preferred: str | None = None
    ) -> None:
        """Have the leader of `stream` (or of its consumer) step down; see `Admin`."""
        await self._admin.step_down(stream, durable, preferred)

    async def ensure_consumer(
        self,
        durable: str,
        filter_subject: str,
        *,
        ack_wait: float = 30.0,
        max_deliver: int = -1,
        max_ack_pending: int = 1000,
        stream: str | None = None,
    ) -> BoundConsumer:
        """Create the durable pull consumer, or bind the existing one.

        One gdc-worker created gets the handler's ack_wait and max_ack_pending; one another
        service created is bound as it is, its other options named in one warning; one that
        cannot serve (another filter, a push consumer, no explicit acks) raises
        `SubscriptionError` (see `Admin`). Returns what the server will do (its `max_deliver`).
        """
        return await self._admin.ensure_consumer(
            stream or self.config.stream_name,
            durable,
            filter_subject,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
            max_ack_pending=max_ack_pending,
        )

    def pull_consumer(
        self,
        durable: str,
        *,
        capacity: int,
        max_capacity: int | None = None,
        stream: str | None = None,
    ) -> PullConsumer:
        """Deliveries of an existing durable consumer, `capacity` of them held at once (up to
        `max_capacity` while they are settled fast); the bus re-issues its pulls on reconnect."""
        consumer = PullConsumer(
            self._nc,
            stream or self.config.stream_name,
            durable,
            capacity=capacity,
            max_capacity=max_capacity,
        )
        self._consumers.add(consumer)
        return consumer

    def forget_consumer(self, consumer: PullConsumer) -> None:
        """Stop tracking a consumer returned by `pull_consumer` (after closing it)."""
        self._consumers.discard(consumer)

    async def pause_consumer(
        self, durable: str, seconds: float, *, stream: str | None = None
    ) -> bool:
        """Pause the durable consumer server-side for `seconds` (0 resumes it), so that no
        replica gets its messages meanwhile; False on servers before 2.11 (no pause API)."""
        return await self._admin.pause_consumer(stream or self.config.stream_name, durable, seconds)

    def stream_messages(
        self, stream: str, subject: str | None = None, start_seq: int = 1
    ) -> AsyncGenerator[StoredMessage]:
        """The messages stored in `stream` (only those on `subject`, a pattern, if given), in
        batches through an ephemeral consumer, up to the last one stored when it gets there.

        None at all when the stream does not exist.
        """
        return scan_messages(
            self._nc, self._js, stream, subject, start_seq, self.config.connect_timeout
        )

    async def count_messages(self, stream: str, subject: str | None = None) -> int:
        """How many messages `stream` holds (on `subject`, a pattern, if given); 0 without it."""
        return await count_messages(self._js, stream, subject)

    async def get_message(self, stream: str, seq: int) -> StoredMessage | None:
        """The message at `seq` in `stream`, or None if there is none (or no such stream)."""
        return await self._admin.get_message(stream, seq)

    async def delete_message(self, stream: str, seq: int, *, erase: bool = True) -> bool:
        """Remove the message at `seq` from `stream`; False if it was not there. `erase`
        overwrites its bytes on disk too (the slow part of a delete)."""
        return await self._admin.delete_message(stream, seq, erase=erase)

    # -- state: what streams and consumers hold now --------------------------------------------

    async def stream_state(self, stream: str | None = None) -> StreamState | None:
        """The event stream's (or `stream`'s) counts, times, limits and leader; None: no stream."""
        return await self._state.stream_state(stream or self.config.stream_name)

    async def consumer_states(self, stream: str | None = None) -> list[ConsumerState]:
        """The state of each durable consumer of the event stream (or `stream`), by name."""
        return await self._state.consumer_states(stream or self.config.stream_name)

    async def consumer_state(self, durable: str, stream: str | None = None) -> ConsumerState | None:
        """One consumer's state, read from its leader; None if it (or the stream) is gone."""
        return await self._state.consumer_state(stream or self.config.stream_name, durable)

    async def subject_counts(self, stream: str, subjects: str) -> dict[str, int]:
        """How many messages `stream` holds on each subject matching `subjects`, unread."""
        return await self._state.subject_counts(stream, subjects)

    async def consumer_differences(
        self,
        durable: str,
        filter_subject: str,
        *,
        ack_wait: float,
        max_ack_pending: int,
        stream: str | None = None,
    ) -> list[str] | None:
        """How the existing consumer differs from what a handler's worker would create;
        None when there is no such consumer. See `Admin.consumer_differences`."""
        return await self._admin.consumer_differences(
            stream or self.config.stream_name,
            durable,
            filter_subject,
            ack_wait=ack_wait,
            max_deliver=-1,  # what HandlerRunner.prepare creates: the runner counts deliveries
            max_ack_pending=max_ack_pending,
        )

    def tail(
        self,
        subject: str,
        *,
        last: int = 0,
        since: datetime | None = None,
        stream: str | None = None,
    ) -> Tail:
        """Follow the messages on `subject` (a pattern) of the event stream (or `stream`) as
        they come, through an ephemeral ordered consumer; see `Tail`."""
        return Tail(self._js, stream or self.config.stream_name, subject, last=last, since=since)

    # -- publishing ---------------------------------------------------------------------------

    async def publish_event(self, event: Event) -> int | None:
        """Publish and wait for JetStream to store it; returns the stream sequence.

        A duplicate of an event published within the duplicate window is not stored again (the
        sequence of the first is returned). A failure that passes (no stream leader while one
        is elected, no ack in time, the connection coming back) is retried, with the same
        `Nats-Msg-Id`, for up to the connect timeout; see `publish_raw`. An event type that is
        not a literal subject (`pin.*`, `a b`) raises `PublishError` before anything is sent.

        With an outbox, the event is queued there instead, and None returned, when the bus is
        not connected, when the outbox still holds events (it goes behind them), or after one
        try that failed for a passing reason; `OutboxFull` when the outbox is full.
        """
        subject = self._subject_of(event)
        headers = event_headers(event)
        hooks = self.hooks
        if hooks.publishing is None and hooks.published is None:
            stored = await self._store(subject, event.to_json(), headers, f"event {event.id}")
            return stored.seq if stored is not None else None
        hooks.run("publishing", subject, event, headers)
        started = time.perf_counter()
        try:
            stored = await self._store(subject, event.to_json(), headers, f"event {event.id}")
        except Exception as exc:
            hooks.run("published", subject, event, "failed", exc, time.perf_counter() - started)
            raise
        outcome = "queued" if stored is None else "duplicate" if stored.duplicate else "stored"
        hooks.run("published", subject, event, outcome, None, time.perf_counter() - started)
        return stored.seq if stored is not None else None

    def _subject_of(self, event: Event) -> str:
        """The subject `event` is published on (`config.subject_for`, with the prefix read once);
        `PublishError` for a type that is not a literal subject. The subjects of the first
        `_MAX_EVENT_TYPES` types seen are kept: a publish of one costs a dict lookup."""
        subject = self._subjects.get(event.type)
        if subject is None:
            subject = self._subject_prefix + check_event_type(event.type)
            if len(self._subjects) < _MAX_EVENT_TYPES:
                self._subjects[event.type] = subject
        return subject

    async def _store(
        self, subject: str, payload: bytes, headers: Mapping[str, str], what: str
    ) -> Stored | None:
        """Where JetStream stored an event, or None when it was queued in the outbox."""
        if self._relay is not None:
            return await self._relay.publish(subject, payload, headers, what)
        return await self._publish(subject, payload, headers, what)

    async def publish_raw(
        self, subject: str, payload: bytes, headers: Mapping[str, str], *, what: str = "message"
    ) -> int:
        """Publish bytes to a stream subject and wait for the ack; returns the stream sequence.

        Tries again, with the same headers, while the failure is one that passes (see
        `bus.publish.publish`), for up to the connect timeout in all; then, or at once for one
        that does not (no stream captures the subject, a request JetStream refuses, the
        connection closed), raises `PublishError`. With a `Nats-Msg-Id` header (every event has
        one), a try whose ack was lost cannot store the message twice. Not seen by the hooks.
        """
        return (await self._publish(subject, payload, headers, what)).seq

    async def _publish(
        self, subject: str, payload: bytes, headers: Mapping[str, str], what: str
    ) -> Stored:
        """The first try through `_first_tries` (the acks of all on one inbox, decoded by
        msgspec: cheaper than a request of nats-py's); one refused for good raises its
        `PublishRefused`, another failed one goes on in `publish()`, which tells a lasting
        failure from one that passes, with the same headers."""
        started = time.monotonic()
        acked: asyncio.Future[Stored | PublishError] = asyncio.get_running_loop().create_future()

        def done(outcome: str, error: PublishError | None, seq: int | None) -> None:
            if not acked.done():
                acked.set_result(
                    Stored(seq or 0, outcome == "duplicate") if error is None else error
                )

        await self._first_tries.publish(
            subject, payload, headers, what=what, done=done, report=False
        )
        stored = await acked
        if isinstance(stored, Stored):
            return stored
        if isinstance(stored, PublishRefused):  # denied, or the stream refused it: no retry
            raise PublishRefused(f"publish of {what} to {subject} refused: {message_of(stored)}")
        return await publish(
            self._nc,
            self._js,
            subject,
            payload,
            headers,
            timeout=max(self.config.connect_timeout - (time.monotonic() - started), 0.0),
            what=what,
        )

    async def publish_event_async(self, event: Event) -> None:
        """Publish without waiting for the ack; `flush()` reports the events that failed.

        Waits only when `MAX_PENDING_PUBLISHES` acks are outstanding, and for at most the
        connect timeout: acks that do not come by then count as failed.

        With an outbox, the event is queued there (and this waits until it is on disk) when
        the bus is not connected or the outbox still holds events; one whose publish fails for
        a passing reason is queued there once that is known; `OutboxFull` when it is full.
        """
        await self._send(self._subject_of(event), event, None)

    async def send_event(self, event: Event) -> PendingPublish:
        """Publish without waiting for the ack, as `publish_event_async` does, and return the
        publish pending: `await` it for the stream sequence (None: queued in the outbox), or
        the `PublishError` of an event that was not stored. `flush()` does not report it.

        What `publish_event_async` raises at once, this does too. `ctx.publish` sends here.
        """
        subject = self._subject_of(event)
        pending = PendingPublish()

        def done(outcome: str, error: PublishError | None, seq: int | None) -> None:
            if error is None:
                pending.resolve(seq)
            else:  # a PublishRefused stays one: the handler's delivery is dead-lettered
                failed = f"publish of event {event.id} to {subject} failed: {message_of(error)}"
                pending.resolve(type(error)(failed))

        await self._send(subject, event, done)
        return pending

    async def _send(self, subject: str, event: Event, done: AckCallback | None) -> None:
        """Send `event` without waiting for its ack, between the hooks; `done`, if given, is
        told how it ended and owns a failure (else `flush()` reports it)."""
        headers = event_headers(event)
        what = f"event {event.id}"
        report = done is None
        hooks = self.hooks
        hooked = hooks.publishing is not None or hooks.published is not None
        if hooked:
            hooks.run("publishing", subject, event, headers)
            started = time.perf_counter()
            owner = done

            def told(outcome: str, error: PublishError | None, seq: int | None) -> None:
                took = time.perf_counter() - started
                hooks.run("published", subject, event, outcome, error, took)
                if owner is not None:
                    owner(outcome, error, seq)

            done = told
        relay = self._relay
        try:
            if relay is not None and not relay.direct:
                await relay.publish(subject, event.to_json(), headers, what)
                if done is not None:
                    done("queued", None, None)
                return
            await self._window.publish(
                subject, event.to_json(), headers, what=what, done=done, report=report
            )
        except Exception as exc:
            if hooked:
                took = time.perf_counter() - started
                hooks.run("published", subject, event, "failed", exc, took)
            raise

    @contextlib.asynccontextmanager
    async def publish_window(self) -> AsyncIterator[AsyncPublishWindow]:
        """A window of async raw publishes of its own, for a batch job such as a replay: its
        acks and failures go to its `done` callbacks and `flush()`, never to the bus's."""
        window = AsyncPublishWindow(self._nc, timeout=self.config.connect_timeout)
        try:
            yield window
        finally:
            await window.close()

    async def flush(self, timeout: float | None = None) -> None:
        """Wait for the ack of every async publish; raise one `PublishError` naming the failures.

        Events with no ack within `timeout` (the connect timeout by default) count as failed;
        with an outbox, those and the ones that failed for a passing reason are queued there
        instead, and this returns once they are on disk.
        """
        await self._window.flush(timeout)

    # -- subscriptions ------------------------------------------------------------------------

    async def subscribe_to_event_type(
        self,
        event_type: str,
        handler: EventHandler,
        *,
        durable: str | None = None,
        max_deliver: int = 5,
        backoff: Sequence[float] = DEFAULT_BACKOFF,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        hooks: Sequence[Hook] = (),
    ) -> None:
        """Call `handler` for every event of this type, with the worker's guarantees.

        The handler takes `(event)` or `(event, ctx)`. It is retried in process (`retry`), then
        nak'd with `backoff`; an event that fails `max_deliver` deliveries, or does not decode,
        goes to the dead-letter stream. `durable` defaults to `gdc-consumer-<type>` (dots as
        dashes, `*` as `star`, `>` as `gt`: the Go bus's name, so both share the consumer). An
        existing consumer is bound as it is: when it delivers fewer times than `max_deliver`,
        the event is dead-lettered on its last delivery.
        """
        await self.subscribe_to_pattern(
            event_type,
            handler,
            durable=durable,
            max_deliver=max_deliver,
            backoff=backoff,
            retry=retry,
            hooks=hooks,
        )

    async def subscribe_to_pattern(
        self,
        pattern: str,
        handler: EventHandler,
        *,
        durable: str | None = None,
        max_deliver: int = 5,
        backoff: Sequence[float] = DEFAULT_BACKOFF,
        retry: RetryPolicy | None = DEFAULT_RETRY,
        hooks: Sequence[Hook] = (),
    ) -> None:
        """Like `subscribe_to_event_type` for a pattern such as `pin.*` or `>`.

        Deliveries run one at a time. If the subscription's consumer can no longer deliver
        (deleted, or the connection lost for good), it stops with an ERROR line, and `close()`
        raises that error.
        """
        if self._closed:
            raise SubscriptionError("the bus is closed")
        try:
            spec = handler_spec(
                handler,
                pattern,
                durable or f"gdc-consumer-{safe_name(str(pattern))}",
                HandlerOptions(max_deliver=max_deliver, backoff=tuple(backoff), retry=retry),
            )
        except GDCWorkerError as exc:
            raise SubscriptionError(f"cannot subscribe to {pattern!r}: {exc}") from None
        await self._subscriptions.add(spec, Hooks(hooks))

    async def unsubscribe_from_event_type(self, event_type: str) -> None:
        """Stop the subscription to this type or pattern; its durable consumer stays."""
        await self._subscriptions.remove(event_type)
