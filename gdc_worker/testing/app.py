"""`TestApp`: apps' handlers run in memory, with JetStream's semantics and a virtual clock.

No server: what is published to a `TestApp` is stored in one in-memory stream (the apps' own,
which they must share) and delivered to one consumer per handler (its durable, as in
production), and each delivery is settled by the
worker's own `SettlePath`: decode, in-process retries, timeout, hooks, `decide()`, the dead
letter. Deliveries count as JetStream counts them (1, then one more per redelivery). What
JetStream and the framework wait for (nak delays, `Retry(delay)`, the waits between in-process
attempts) waits on a virtual clock that `advance()` and `join()` move, so a test of a long
backoff takes milliseconds. A handler's own sleeps stay real, and so does its `timeout`:
`publish`, `advance` and `join` wait for running handlers in real time, so one that never
returns holds them (bound it with a `timeout`, or the test's wait with `anyio.fail_after`).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections.abc import Callable, Mapping
from types import TracebackType

import anyio
import anyio.abc

from ..app import App, PendingPublish
from ..bus.publish import message_size, oversized
from ..config import NATSConfig
from ..dlq import DeadLetterRecord, FailedMessage
from ..errors import PublishError, PublishRefused, WorkerError
from ..events import MSG_ID_HEADER, Event, event_headers
from ..hooks import Hooks
from ..runner import SettlePath
from ..subjects import check_event_type, subjects_overlap

__all__ = ["TestApp"]

#: nats-server's default max_payload: the bus refuses a bigger message, and so does the test app.
MAX_PAYLOAD = 1024 * 1024


@dataclasses.dataclass(eq=False)
class _Delivery:
    """One delivery of a stored message to a consumer: what a `Delivery` has, settled in memory."""

    consumer: _Consumer
    stream: str
    stream_seq: int
    subject: str
    deliveries: int
    data: bytes
    headers: dict[str, str]

    async def ack(self) -> None:
        """Handled: JetStream would forget it for this consumer; so does the test app."""

    async def nak(self, delay: float = 0.0) -> None:
        """Redeliver after `delay` virtual seconds, one delivery more."""
        self.consumer.redeliver(self, delay)

    async def term(self, reason: str = "") -> None:
        """Never redeliver."""

    async def in_progress(self) -> None:
        """Still working (the test app never expires a running handler's delivery)."""


@dataclasses.dataclass(eq=False)
class _Consumer:
    """One handler's durable consumer: the subject it filters on and its settle path."""

    durable: str
    filter_subject: str
    path: SettlePath[_Delivery]
    redeliver: Callable[[_Delivery, float], None]


class _Publisher:
    """What an app's `ctx.publish` reaches: the test app's stream, between the app's hooks."""

    def __init__(self, test: TestApp, config: NATSConfig, hooks: Hooks) -> None:
        self._test = test
        self._config = config
        self._hooks = hooks

    async def send_event(self, event: Event) -> PendingPublish:
        """Store `event` (collected in `TestApp.published`) and deliver it to its handlers; a
        subject no stream captures fails the publish, and so the delivery, as on a server."""
        subject = self._config.subject_for(check_event_type(event.type))
        headers = event_headers(event)
        self._hooks.run("publishing", subject, event, headers)
        self._test.published.append(event)
        pending = PendingPublish()
        try:
            seq, duplicate = self._test._store(subject, event.to_json(), headers)
        except PublishError as exc:
            self._hooks.run("published", subject, event, "failed", exc, 0.0)
            pending.resolve(exc)
            return pending
        outcome = "duplicate" if duplicate else "stored"
        self._hooks.run("published", subject, event, outcome, None, 0.0)
        pending.resolve(seq)
        return pending


class _DeadLetters:
    """An app's dead-letter stream, in memory: the same records the real one holds."""

    def __init__(self, test: TestApp, stream: str) -> None:
        self._test = test
        self.stream = stream

    async def record(
        self,
        *,
        reason: str,
        consumer: str,
        handler: str,
        delivery: FailedMessage,
        error: BaseException | None,
    ) -> int:
        """Keep the record `DeadLetterQueue.record` would store; returns its id (from 1)."""
        record = DeadLetterRecord.of(
            delivery, reason=reason, consumer=consumer, handler=handler, error=error
        )
        self._test.dead_letters.append(record)
        if error is not None:
            self._test._failures.append(error)
        return len(self._test.dead_letters)


class TestApp:
    """Runs the handlers of `app` (and `more_apps`) in memory: `async with TestApp(app) as t:`.

    - `await t.publish(event)` delivers `event` to the matching handlers and returns once all
      that is due now has run (`publish_raw` stores bytes that need not be an event); what a
      server would refuse (a subject outside the stream, over 1 MiB) raises `PublishRefused`;
    - `t.published` collects what handlers published with `ctx.publish`, which is delivered to
      the matching handlers of every app under test too;
    - `t.dead_letters` holds the `DeadLetterRecord`s the real dead-letter stream would;
    - `await t.advance(seconds)` moves the virtual clock (`t.now`) and runs what falls due;
      `await t.join()` runs until nothing is left to do, through every pending delay;
      `join(fail_fast=True)` then re-raises the error of the last event dead-lettered on one.

    Hooks run as in production: the delivery points, `publishing` and `published` around
    `ctx.publish`, `worker_ready` on entering and `worker_stopping` on leaving the block, where
    handlers still running are cancelled. Handler calls are not limited by `concurrency`.
    A running handler is kept in progress, as the worker's keep-alive does, so its delivery
    never expires at `ack_wait`; expiry through a blocked event loop is not simulated.
    """

    __test__ = False  # a test helper, not a test class for pytest to collect

    def __init__(self, app: App, *more_apps: App) -> None:
        self.apps = (app, *more_apps)
        #: What handlers published with `ctx.publish`, in order.
        self.published: list[Event] = []
        #: What was dead-lettered, in order.
        self.dead_letters: list[DeadLetterRecord] = []
        self._config = app.config
        self._now = 0.0
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._seqs = itertools.count(1)
        self._ids: dict[str, tuple[int, float]] = {}
        self._failures: list[BaseException] = []
        self._busy = 0
        self._idle: anyio.Event | None = None
        self._group: anyio.abc.TaskGroup | None = None
        self._consumers: dict[str, _Consumer] = {}
        for each in self.apps:
            self._add(each)

    def _add(self, app: App) -> None:
        config = app.config
        first = self._config
        if (config.stream_name, config.stream_subjects) != (
            first.stream_name,
            first.stream_subjects,
        ):
            raise WorkerError(
                f"app {app.name!r} is on stream {config.stream_name} "
                f"({', '.join(config.stream_subjects)}), app {self.apps[0].name!r} on "
                f"{first.stream_name} ({', '.join(first.stream_subjects)}): a test app holds one "
                "stream, so test each stream's apps in a TestApp of their own"
            )
        publisher = _Publisher(self, config, app.hooks)
        dead_letters = _DeadLetters(self, config.dlq_stream_name)
        for spec in app.handlers.values():
            if spec.durable in self._consumers:
                raise WorkerError(
                    f"durable {spec.durable!r} of app {app.name!r} is another app's too: "
                    "give one of the handlers another `durable=`"
                )
            path = SettlePath(publisher, dead_letters, spec, app.hooks, _dropped, sleep=self._sleep)
            self._consumers[spec.durable] = _Consumer(
                spec.durable, config.subject_for(spec.pattern), path, self._redeliver
            )

    @property
    def now(self) -> float:
        """The virtual clock: seconds since the test app was made, as `advance()` moved it."""
        return self._now

    async def __aenter__(self) -> TestApp:
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        for app in self.apps:
            app.hooks.run("worker_ready", app.name, list(app.handlers.values()))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        for app in self.apps:
            app.hooks.run("worker_stopping", app.name)
        group, self._group = self._tasks(), None
        group.cancel_scope.cancel()
        try:
            return await group.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as raised:
            if exc is not None and raised.exceptions == (exc,):
                return False  # the block's own error (fail_fast's, say): raised as it is
            raise

    async def publish(self, event: Event) -> int:
        """Store `event` as the bus would, deliver it, and run what is due now; its sequence."""
        subject = self._config.subject_for(check_event_type(event.type))
        seq, _ = self._store(subject, event.to_json(), event_headers(event))
        await self._run_due()
        return seq

    async def publish_raw(
        self, subject: str, data: bytes, headers: Mapping[str, str] | None = None
    ) -> int:
        """Store bytes on a stream subject (`config.subject_for(type)`), as the bus's
        `publish_raw` does, deliver them, and run what is due now; their sequence."""
        seq, _ = self._store(subject, bytes(data), dict(headers or {}))
        await self._run_due()
        return seq

    async def advance(self, seconds: float) -> None:
        """Move the virtual clock by `seconds`, running what falls due on the way."""
        if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0):
            raise WorkerError(
                f"advance: seconds must be a finite number of seconds >= 0, got {seconds!r}"
            )
        until = self._now + seconds
        await self._run_due()
        while self._timers and self._timers[0][0] <= until:
            self._now = self._timers[0][0]
            await self._run_due()
        self._now = until

    async def join(self, *, fail_fast: bool = False) -> None:
        """Run until nothing is left to do, moving the virtual clock through every delay.

        With `fail_fast`, then re-raise the error of the last event dead-lettered on one (a
        handler's error, or the decode error of a message that is not an event), once. One
        that is not an `Exception` (`KeyboardInterrupt`, `SystemExit`, a handler's own
        `CancelledError`) is raised as the cause of a `WorkerError` naming it: as it is, it
        would stop the test run, or read as the test's own cancellation.
        """
        await self._run_due()
        while self._timers:
            self._now = self._timers[0][0]
            await self._run_due()
        if fail_fast and self._failures:
            error = self._failures[-1]
            self._failures.clear()
            if not isinstance(error, Exception):
                raise WorkerError(f"a handler raised {type(error).__name__}") from error
            raise error

    def _store(self, subject: str, data: bytes, headers: dict[str, str]) -> tuple[int, bool]:
        """Store a message, or find it a duplicate (its `Nats-Msg-Id` seen within the stream's
        duplicate window); returns its sequence and whether it was one."""
        config = self._config
        if not any(subjects_overlap(subject, s) for s in config.stream_subjects):
            raise PublishRefused(
                f"no stream captures {subject}: {config.stream_name} is on "
                f"{', '.join(config.stream_subjects)}"
            )
        msg_id = headers.get(MSG_ID_HEADER)
        size = message_size(headers, data)
        if size > MAX_PAYLOAD:
            what = "a message" if msg_id is None else f"event {msg_id}"
            raise oversized(what, subject, size, MAX_PAYLOAD)
        if msg_id is not None:
            seen = self._ids.get(msg_id)
            if seen is not None and self._now - seen[1] < config.duplicate_window:
                return seen[0], True
        seq = next(self._seqs)
        if msg_id is not None:
            self._ids[msg_id] = (seq, self._now)
        for consumer in self._consumers.values():
            if subjects_overlap(subject, consumer.filter_subject):
                message = _Delivery(
                    consumer, config.stream_name, seq, subject, 1, data, dict(headers)
                )
                self._deliver(message)
        return seq, False

    def _deliver(self, delivery: _Delivery) -> None:
        self._busy += 1
        self._tasks().start_soon(self._process, delivery)

    async def _process(self, delivery: _Delivery) -> None:
        try:
            await delivery.consumer.path.process(delivery)
        finally:
            self._done()

    def _redeliver(self, delivery: _Delivery, delay: float) -> None:
        again = dataclasses.replace(delivery, deliveries=delivery.deliveries + 1)
        self._at(delay, lambda: self._deliver(again))

    async def _sleep(self, delay: float) -> None:
        """Wait `delay` seconds on the virtual clock."""
        woken = anyio.Event()

        def wake() -> None:
            self._busy += 1
            woken.set()

        self._at(delay, wake)
        self._done()
        await woken.wait()

    def _at(self, delay: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (self._now + max(0.0, delay), next(self._order), callback))

    def _done(self) -> None:
        self._busy -= 1
        if self._busy == 0 and self._idle is not None:
            self._idle.set()

    async def _run_due(self) -> None:
        """Let everything running settle or wait on the clock, fire what is due, again."""
        while True:
            while self._busy:
                self._idle = anyio.Event()
                await self._idle.wait()
            if not self._timers or self._timers[0][0] > self._now:
                return
            while self._timers and self._timers[0][0] <= self._now:
                heapq.heappop(self._timers)[2]()

    def _tasks(self) -> anyio.abc.TaskGroup:
        if self._group is None:
            raise WorkerError("use the test app as `async with TestApp(app) as t:`")
        return self._group


async def _dropped(delivery: _Delivery) -> None:
    """A handler the test app cancelled on leaving its block: nothing to hand back to."""
