"""The bus's side of the outbox: where an event publish goes when JetStream cannot take it,
and the relay task that drains the outbox once it can.

While the outbox holds events, or the client is not connected, every event publish is queued
there, behind the ones before it, so a publisher's events reach the stream in the order it
published them. Otherwise a publish tries JetStream once, and a failure that passes (no ack
in time, the connection going) queues the event instead of waiting to retry; so does a refusal
that may be the stream's absence (`keep_refused`), once the stream is set up again. The relay
publishes the queued events in insertion order with their original `Nats-Msg-Id`
(`outbox.drain`), and hands publishing back to JetStream once it found the outbox empty with
no event on its way there.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping

import anyio
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from ..config import NATSConfig, redact_url
from ..errors import ConfigError, GDCWorkerError, PublishError, PublishRefused, describe
from ..outbox import Outbox, QueuedEvent, drain
from .admin import Admin, StreamSpec
from .publish import Stored, check_size, publish, publish_once

__all__ = ["Relay"]

log = logging.getLogger("gdc_worker.bus")

#: How often the relay looks whether the client is connected again.
_CONNECTED_POLL_S = 0.1
#: How long closing waits for the relay to stop before it closes the outbox anyway.
_CLOSE_WAIT_S = 1.0


class Relay:
    """Publishing through an outbox, and the relay task draining it (`start()`, `close()`)."""

    def __init__(self, outbox: Outbox, nc: NATS, js: JetStreamContext, config: NATSConfig) -> None:
        self.outbox = outbox
        self._nc = nc
        self._js = js
        self._timeout = config.connect_timeout
        self._admin = Admin(nc, js, redact_url(config.url), timeout=self._timeout)
        self._stream = StreamSpec.of(config)
        self._stream_setup = config.stream_setup
        self._pause = max(config.reconnect_wait, _CONNECTED_POLL_S)
        # Until the relay found the outbox empty: what is left from the last run goes first.
        self._queueing = outbox.stats().events > 0
        self._adding = 0  # events on their way to the outbox
        self._wake = asyncio.Event()
        self._empty = asyncio.Event()
        if not self._queueing:
            self._empty.set()
        self._ready = asyncio.Event()
        self._failure: GDCWorkerError | None = None
        self._looking = asyncio.Lock()  # at the stream, after a refusal: `_stream_gone`
        self._stream_back_at = -math.inf  # when `_stream_gone` last set the stream up again
        self._task: asyncio.Task[None] | None = None

    def start(
        self,
        connecting: asyncio.Task[None] | None,
        connected: Callable[[], Awaitable[None]],
    ) -> None:
        """Start relaying: after `connecting` (a connect in the background), if given, and
        `connected()`, which sets the stream up; the client is connected and set up otherwise."""
        if connecting is None:
            self._ready.set()
        self._task = asyncio.create_task(self._run(connecting, connected))

    async def wait_ready(self) -> None:
        """Wait until the client is connected and the stream set up; raises the `ConfigError`
        that keeps the stream from being set up, or the `PublishError` of a relay that stopped."""
        await self._ready.wait()
        if self._failure is not None:
            raise self._failure

    async def wait_empty(self) -> None:
        """Wait until the relay found the outbox empty: every queued event is in JetStream;
        raises the `PublishError` of a relay that stopped."""
        await self._empty.wait()
        if isinstance(self._failure, PublishError):
            raise self._failure

    @property
    def direct(self) -> bool:
        """Whether a publish goes to JetStream now: connected, with nothing queued before it."""
        return not self._queueing and self._nc.is_connected

    async def publish(
        self, subject: str, payload: bytes, headers: Mapping[str, str], what: str
    ) -> Stored | None:
        """Where JetStream stored the message, or None once it is queued in the outbox.

        Raises `OutboxFull`, or `PublishError` for a failure that does not pass (no stream
        captures the subject while the event stream is there, a message over the server's
        max_payload or the stream's max_msg_size).
        """
        if self.direct:
            sent_at = time.monotonic()
            try:
                stored = await publish_once(
                    self._nc, self._js, subject, payload, headers, timeout=self._timeout, what=what
                )
            except PublishRefused:
                if not await self.keep_refused(subject, payload, headers, what, sent_at):
                    raise
                return None
            if stored is not None:
                return stored
        else:
            check_size(self._nc, subject, payload, headers, what)
        await self.submit(subject, payload, headers, what)
        return None

    def submit(
        self, subject: str, payload: bytes, headers: Mapping[str, str], what: str
    ) -> asyncio.Future[None]:
        """Queue a message in the outbox; from now on publishes queue behind it."""
        future = self.outbox.submit(subject, payload, headers, what)
        self._queueing = True
        self._empty.clear()
        self._adding += 1
        future.add_done_callback(self._added)
        return future

    async def keep_refused(
        self, subject: str, payload: bytes, headers: Mapping[str, str], what: str, sent_at: float
    ) -> bool:
        """Queue a message JetStream refused, sent at `sent_at` (`time.monotonic()`), when the
        refusal may be the stream's absence (`_stream_gone`); False when it stands, and the
        message is not queued. What both `publish()` and the bus's async publishes do."""
        if not await self._stream_gone(sent_at):
            return False
        await self.submit(subject, payload, headers, what)
        return True

    def _added(self, _: asyncio.Future[None]) -> None:
        self._adding -= 1
        self._wake.set()

    async def close(self) -> None:
        """Stop the relay and close the outbox; what it holds drains at the next start."""
        if self._task is not None:
            self._task.cancel()
            # Bounded: a relay waiting on nats-py's background connect may not see the
            # cancellation until that connect gives up; closing the client ends it then.
            await asyncio.wait({self._task}, timeout=_CLOSE_WAIT_S)
        await self.outbox.close()
        left = self.outbox.stats().events
        if left:
            log.warning(
                "%d event(s) left in the outbox %s: they are published at the next start, or "
                "by `gdc-worker outbox flush --path %s`",
                left,
                self.outbox.path,
                self.outbox.path,
            )

    async def _run(
        self, connecting: asyncio.Task[None] | None, connected: Callable[[], Awaitable[None]]
    ) -> None:
        try:
            if connecting is not None:
                await connecting
                if not await self._set_up(connected):
                    return
                self._ready.set()
            await self._relay()
        except Exception as exc:
            log.exception(
                "the outbox relay stopped; events stay in %s until the next start",
                self.outbox.path,
            )
            # Whoever waits for the relay hears it stopped, rather than waiting for good.
            self._failure = PublishError(f"the outbox relay stopped: {describe(exc)}")
            self._ready.set()
            self._empty.set()

    async def _set_up(self, connected: Callable[[], Awaitable[None]]) -> bool:
        """Set the stream up once connected, trying again while it fails for a passing reason;
        False after a `ConfigError` (a stream of another shape): nothing can be relayed."""
        while True:
            try:
                await connected()
                return True
            except ConfigError as exc:
                log.error("the outbox is not relayed: %s; events stay in %s", exc, self.outbox.path)
                self._failure = exc
                self._ready.set()
                return False
            except GDCWorkerError as exc:
                log.warning("cannot set the stream up yet (%s); trying again", exc)
                await anyio.sleep(self._pause)

    async def _relay(self) -> None:
        while True:
            while not self._nc.is_connected:
                await anyio.sleep(_CONNECTED_POLL_S)
            self._wake.clear()
            try:
                sent = await self.drain()
            except PublishError as exc:
                left = self.outbox.stats().events
                log.warning(
                    "outbox: %s; %d event(s) wait, trying again in %gs", exc, left, self._pause
                )
                await anyio.sleep(self._pause)
                continue
            if sent:
                log.info("outbox: %d queued event(s) published", sent)
            if self._adding or self._wake.is_set():  # queued meanwhile: drain those too
                continue
            self._queueing = False
            self._empty.set()
            await self._wake.wait()

    async def drain(
        self,
        progress: Callable[[int], None] | None = None,
        refused: Callable[[str], None] | None = None,
    ) -> int:
        """Publish what the outbox holds, oldest first, until it is empty; returns how many
        were published. `progress` is told how many left the queue as they do.

        An event JetStream refuses for good is set aside in the file's refused table, the
        refusal told to `refused` (logged as an ERROR without it), and the events behind it
        go on. Raises `PublishError` when one cannot be published yet (no ack, the stream
        missing): what is left stays queued, in order. The relay task drains with this, and
        so does `gdc-worker outbox flush` (`NATSEventBus.drain_outbox`).
        """
        sent = 0

        def published(n: int) -> None:
            nonlocal sent
            sent += n
            if progress is not None:
                progress(n)

        while True:
            try:
                await drain(self.outbox, self._send, published)
            except _SetAside as aside:
                if aside.refusal is not None:
                    (refused or self._log_refused)(aside.refusal)
                    if progress is not None:
                        progress(1)
                continue
            return sent

    def _log_refused(self, refusal: str) -> None:
        log.error(
            "outbox: %s; set aside for an operator (the events behind it go on): "
            "`gdc-worker outbox refused --path %s` lists it",
            refusal,
            self.outbox.path,
        )

    async def _send(self, row: QueuedEvent) -> None:
        """Publish a queued event. One that JetStream refuses for good is set aside (`_SetAside`
        stops `drain` there), so that the events behind it go on, unless the refusal is the
        stream's absence: then they all wait for it (`PublishError`)."""
        sent_at = time.monotonic()
        try:
            await publish(
                self._nc,
                self._js,
                row.subject,
                row.payload,
                row.headers,
                timeout=self._timeout,
                what=row.what,
            )
        except PublishRefused as exc:
            if await self._stream_gone(sent_at):
                raise PublishError(f"{exc}: the stream {self._stream.name} was missing") from None
            refusal = str(exc)
            if not await self.outbox.refuse(row.id, refusal):  # another process took it
                raise _SetAside(None) from None
            raise _SetAside(refusal) from None

    async def _stream_gone(self, sent_at: float) -> bool:
        """Whether the event stream may have been missing when a message sent at `sent_at`
        (`time.monotonic()`) was refused: it was set up again since, or it is missing now (a
        server that came back with an empty store, say), and then set up again as connecting
        does; True too while that cannot be told or done: a refusal then says nothing about
        the message. One look at a time, so a burst of refused publishes sets it up once."""
        async with self._looking:
            if sent_at < self._stream_back_at:
                return True
            try:
                if await self._admin.stream_changes(self._stream) is not None:
                    return False
                await self._admin.ensure_stream(self._stream, self._stream_setup)
            except GDCWorkerError as exc:
                log.warning("outbox: the stream %s is not usable: %s", self._stream.name, exc)
                return True
            self._stream_back_at = time.monotonic()
        log.warning("outbox: the stream %s was missing, and is set up again", self._stream.name)
        return True


class _SetAside(Exception):
    """A queued event was set aside (with this refusal, None if another process did it):
    `drain` starts again behind it."""

    def __init__(self, refusal: str | None) -> None:
        super().__init__(refusal)
        self.refusal = refusal
