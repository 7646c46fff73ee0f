"""Publishing to JetStream: one message waiting for its ack, or many through a window of acks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import anyio
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from ..errors import PublishError, PublishRefused, describe, message_of
from .connection import Client, denied
from .state import permission_denied

__all__ = [
    "MAX_PENDING_PUBLISHES",
    "MAX_RETRY_WAIT_S",
    "RETRY_WAIT_S",
    "TRY_TIMEOUT_S",
    "AsyncPublishWindow",
    "Requeue",
    "Stored",
    "check_size",
    "message_size",
    "oversized",
    "publish",
    "publish_once",
]

log = logging.getLogger("gdc_worker.bus")

#: What `AsyncPublishWindow` allows in flight before `publish()` waits for acks.
MAX_PENDING_PUBLISHES = 4000
#: The pause before a publish that failed for a passing reason is tried again; it doubles...
RETRY_WAIT_S = 0.05
#: ... up to this.
MAX_RETRY_WAIT_S = 0.5
#: The longest one try of `publish()` waits for its ack, so that a try lost with a dying server
#: leaves time for more within the publish's timeout.
TRY_TIMEOUT_S = 2.0
_MIN_TRY_TIMEOUT_S = 0.01
_UNAVAILABLE = 503
_STREAM_NAMES = "$JS.API.STREAM.NAMES"
#: Failures after which the same publish may well succeed: no ack in time (the server that had
#: the stream's leader died, or is slow), and the client between two connections.
_PASSING = (
    TimeoutError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
)


class Stored(NamedTuple):
    """Where JetStream stored a publish: its sequence, and whether it had it already."""

    seq: int
    #: True when the stream had a message of this `Nats-Msg-Id` within its duplicate window.
    duplicate: bool


#: Told how an async publish ended: its outcome (`stored`, `duplicate`, `queued` in the outbox
#: or `failed`), the error of a failed one (`PublishRefused` when sending it again cannot
#: help), and the stream sequence of a stored one.
AckCallback = Callable[[str, PublishError | None, int | None], None]


class Requeue(Protocol):
    """Where a window hands the publishes JetStream did not take: the outbox (`relay.Relay`)."""

    def submit(
        self, subject: str, payload: bytes, headers: Mapping[str, str], what: str
    ) -> asyncio.Future[None]:
        """Queue a message that failed for a passing reason; done once it is on disk."""
        ...

    async def keep_refused(
        self, subject: str, payload: bytes, headers: Mapping[str, str], what: str, sent_at: float
    ) -> bool:
        """Queue a message JetStream refused, sent at `sent_at`, if the refusal may be the
        stream's absence; False when the refusal stands."""
        ...


def message_size(headers: Mapping[str, str], payload: bytes) -> int:
    """The bytes a message takes against the server's max_payload: headers as sent, payload."""
    # NATS/1.0\r\n, then "key: value\r\n" each, then \r\n.
    head = 10 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items()) + 2
    return head + len(payload)


def check_size(
    nc: NATS, subject: str, payload: bytes, headers: Mapping[str, str], what: str
) -> None:
    """Refuse a message over the server's max_payload before it is sent.

    nats-py checks the payload alone, and the server closes the whole connection for a message
    whose headers push it over: every other publish and delivery on it would fail too.
    """
    if not headers:
        size = len(payload)
    else:
        chars = sum(len(key) + len(value) for key, value in headers.items())
        if len(payload) + 4 * chars + 12 + 4 * len(headers) <= nc.max_payload:
            return  # under the limit even if every character took 4 bytes: no need to count
        size = message_size(headers, payload)
    if size > nc.max_payload:
        raise oversized(what, subject, size, nc.max_payload)


def oversized(what: str, subject: str, size: int, max_payload: int) -> PublishRefused:
    """The refusal of a message of `size` bytes, headers included, over `max_payload`."""
    return PublishRefused(
        f"publish of {what} to {subject} refused: {size} bytes with headers, over the "
        f"server's max_payload of {max_payload}"
    )


async def publish(
    nc: NATS,
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    headers: Mapping[str, str],
    *,
    timeout: float,
    what: str,
) -> Stored:
    """Publish bytes to a stream subject and wait for the ack; returns where it is stored.

    A failure that passes (no stream leader while one is elected, no ack in time, JetStream
    unavailable, the connection coming back) is tried again with the same headers, so with
    the same `Nats-Msg-Id` the stream stores the message once however often it is sent, after
    a pause that doubles from `RETRY_WAIT_S` up to `MAX_RETRY_WAIT_S`, for up to `timeout`
    seconds in all. Then, or at once for a failure that does not pass (no stream for the
    subject, a request JetStream refuses, the connection closed), raises `PublishError` naming
    `what`, the subject and the cause.
    """
    stored = await _publish(nc, js, subject, payload, headers, timeout, what, retry=True)
    assert stored is not None, "publish() retries until stored or raises"
    return stored


async def publish_once(
    nc: NATS,
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    headers: Mapping[str, str],
    *,
    timeout: float,
    what: str,
) -> Stored | None:
    """One try of `publish()`, for a caller that keeps the message when it fails (the outbox).

    Returns where it is stored, or None after a failure that passes: sent again with the same
    headers, the message is stored once. A failure that does not pass raises `PublishError`.
    """
    return await _publish(nc, js, subject, payload, headers, timeout, what, retry=False)


async def _publish(
    nc: NATS,
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    headers: Mapping[str, str],
    timeout: float,
    what: str,
    *,
    retry: bool,
) -> Stored | None:
    check_size(nc, subject, payload, headers, what)
    headers = dict(headers)
    start = time.monotonic()
    deadline = start + timeout
    wait = RETRY_WAIT_S
    tries = 0
    stream_known = False  # a stream captures the subject: no responders means an election
    while True:
        tries += 1
        try_timeout = max(min(TRY_TIMEOUT_S, deadline - time.monotonic()), _MIN_TRY_TIMEOUT_S)
        try:
            ack = await js.publish(subject, payload, headers=headers, timeout=try_timeout)
        except (nats.errors.Error, TimeoutError) as exc:
            failure = exc
        else:
            if tries > 1:
                log.info(
                    "publish of %s to %s stored after %d tries in %.1fs",
                    what,
                    subject,
                    tries,
                    time.monotonic() - start,
                )
            return Stored(ack.seq, bool(ack.duplicate))
        passes = _passes(failure)
        note = ""
        denied = permission_denied(failure)
        if denied:  # the server refused it: it times out, and trying again cannot help
            raise PublishRefused(f"publish of {what} to {subject} refused: {denied}")
        if passes is None:  # no responders
            remaining = deadline - time.monotonic()
            stream_known = stream_known or await _stream_captures(nc, subject, remaining)
            passes = stream_known
            note = "" if passes else " (no stream captures the subject)"
        if passes and not retry:
            log.debug(
                "publish of %s to %s: %s; kept to send again", what, subject, describe(failure)
            )
            return None
        lasting = not passes
        if passes and time.monotonic() + wait >= deadline:
            took = time.monotonic() - start
            note = f" (after {tries} {'try' if tries == 1 else 'tries'} in {took:.1f}s)"
            passes = False
        if not passes:
            raise (PublishRefused if lasting else PublishError)(
                f"publish of {what} to {subject} failed: {describe(failure)}{note}"
            ) from None
        log.debug("publish of %s to %s: %s; trying again", what, subject, describe(failure))
        await anyio.sleep(wait)
        wait = min(wait * 2, MAX_RETRY_WAIT_S)


def _passes(failure: BaseException) -> bool | None:
    """Whether trying a failed publish again may store it; None for no responders at all.

    No responders means either that no stream captures the subject, which lasts, or that the
    stream has no leader while one is elected (`_stream_captures` tells them apart).
    """
    if isinstance(failure, nats.js.errors.NoStreamResponseError | nats.errors.NoRespondersError):
        return None
    if isinstance(failure, nats.js.errors.APIError):
        return failure.code == _UNAVAILABLE  # 400s and 500s say the same on every try
    return isinstance(failure, _PASSING)


async def _stream_captures(nc: NATS, subject: str, timeout: float) -> bool:
    """Whether a stream captures `subject`, asking JetStream's meta leader; True if it cannot
    tell within `timeout` (itself being elected, say), so the publish goes on trying."""
    request = msgspec.json.encode({"subject": subject})
    try:
        reply = await nc.request(
            _STREAM_NAMES, request, timeout=max(min(TRY_TIMEOUT_S, timeout), _MIN_TRY_TIMEOUT_S)
        )
        names = _names_decoder.decode(reply.data)
    except (nats.errors.Error, TimeoutError, msgspec.DecodeError):
        return True
    return names.error is not None or bool(names.streams)


class _StreamNames(msgspec.Struct):
    streams: list[str] | None = None
    error: dict[str, object] | None = None


_names_decoder = msgspec.json.Decoder(_StreamNames)


class _ApiError(msgspec.Struct):
    description: str = "error"
    code: int = 0


class _PubAckReply(msgspec.Struct):
    error: _ApiError | None = None
    seq: int = 0
    duplicate: bool = False


_ack_decoder = msgspec.json.Decoder(_PubAckReply)


@dataclass(slots=True)
class _Pending:
    what: str
    subject: str
    done: AckCallback | None
    payload: bytes
    headers: Mapping[str, str]
    sent_at: float
    #: Whether `flush()` reports a failure too; not when `done` owns the outcome.
    report: bool


class AsyncPublishWindow:
    """Publishes whose acks arrive on one direct inbox subscription, with no future per message.

    At most `limit` acks are outstanding: `publish()` waits for room, for at most `timeout`.
    A publish with no ack `timeout` seconds after it was sent counts as failed, told to its
    `done` (within twice that at most), so every publish ends. `flush()` reports every failure
    once, but those whose `done` owns them.
    With `requeue` (the outbox), a publish that failed for a passing reason (no ack in time,
    the connection between two servers, JetStream unavailable) is queued there instead, and
    so is one JetStream refused when the refusal may be the stream's absence, as a publish
    that waits for its ack is (`Relay.publish`).
    """

    def __init__(
        self,
        nc: Client,
        *,
        timeout: float,
        limit: int = MAX_PENDING_PUBLISHES,
        requeue: Requeue | None = None,
    ) -> None:
        self._nc = nc
        self._timeout = timeout
        self._limit = limit
        self._requeue = requeue
        self._requeued: set[asyncio.Future[Any]] = set()
        self._prefix = ""
        self._inbox: Subscription | None = None
        self._next_token = 0
        self._pending: dict[int, _Pending] = {}
        self._failed: list[str] = []
        # Made when a task waits for the acks (`wait_drained`) or for room, set when the wait
        # is over: a publish and an ack touch no event when nobody waits.
        self._drained: asyncio.Event | None = None
        self._room: asyncio.Event | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._unlisten: Callable[[], None] = lambda: None

    async def publish(
        self,
        subject: str,
        payload: bytes,
        headers: Mapping[str, str],
        *,
        what: str,
        done: AckCallback | None = None,
        report: bool = True,
    ) -> None:
        """Send without waiting for the ack; a failure is reported by `flush()` (unless not
        `report`: `done` owns it), and to `done` when given, once the ack (or the failure) is
        known.

        A message over the server's max_payload, or with a header name NATS refuses, raises
        `PublishRefused` at once.
        """
        nc = self._nc
        try:
            block = nc.header_block(headers)
        except nats.errors.BadHeaderError as exc:
            raise PublishRefused(
                f"publish of {what} to {subject} refused: {describe(exc)}"
            ) from None
        if len(block) + len(payload) > nc.max_payload:
            raise oversized(what, subject, len(block) + len(payload), nc.max_payload)
        while len(self._pending) >= self._limit:
            if self._room is None:
                self._room = asyncio.Event()
            room = self._room
            with anyio.move_on_after(self._timeout):
                await room.wait()
            if not room.is_set():  # acks lost (a reconnect): count those as failed
                for token in list(self._pending):
                    self._settle(
                        token, "no acknowledgement while the window was full", passing=True
                    )
        if not self._prefix:
            self._prefix = nc.new_inbox() + "."
            self._inbox = await nc.subscribe_direct(self._prefix + "*", self._on_ack)
            self._unlisten = nc.listen_for_refusals(self._on_refused)
        self._next_token += 1
        token = self._next_token
        now = time.monotonic()
        self._pending[token] = _Pending(what, subject, done, payload, headers, now, report)
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().call_later(self._timeout, self._expire)
        try:
            await nc.publish_block(subject, self._prefix + str(token), payload, block)
        except nats.errors.Error as exc:
            self._settle(token, describe(exc), passing=isinstance(exc, _PASSING))

    async def flush(self, timeout: float | None = None) -> None:
        """Wait for every ack (or for the outbox to have it); raise one `PublishError` naming
        the failures.

        Publishes with no ack within `timeout` (the window's by default) count as failed.
        """
        timeout = self._timeout if timeout is None else timeout
        await self.wait_drained(timeout)
        for token in list(self._pending):
            self._settle(token, f"no acknowledgement within {timeout:g}s", passing=True)
        if self._requeued:
            await asyncio.wait(set(self._requeued))
        failed, self._failed = self._failed, []
        if failed:
            shown = "; ".join(failed[:10]) + (
                f"; and {len(failed) - 10} more" if len(failed) > 10 else ""
            )
            raise PublishError(f"{len(failed)} event(s) were not stored: {shown}")

    async def wait_drained(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the outstanding acks."""
        if not self._pending:
            return
        if self._drained is None:
            self._drained = asyncio.Event()
        with anyio.move_on_after(timeout):
            await self._drained.wait()

    async def close(self) -> None:
        """Stop listening for acks, for a window used for a while only; call `flush()` first."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._inbox is not None:
            self._unlisten()
            with contextlib.suppress(nats.errors.Error):
                await self._inbox.unsubscribe()
            self._inbox, self._prefix = None, ""

    def unsettled(self) -> list[str]:
        """What failed or got no ack so far, for a last log line on close."""
        return self._failed + [f"{p.what} to {p.subject}" for p in self._pending.values()]

    def _expire(self) -> None:
        """Count the publishes sent `timeout` seconds ago or more and still without an ack as
        failed (acks lost with a connection); then wait for the oldest one left."""
        self._expiry = None
        now = time.monotonic()
        while self._pending:
            token, oldest = next(iter(self._pending.items()))
            if now - oldest.sent_at < self._timeout:
                delay = oldest.sent_at + self._timeout - now
                self._expiry = asyncio.get_running_loop().call_later(delay, self._expire)
                return
            self._settle(token, f"no acknowledgement within {self._timeout:g}s", passing=True)

    def _on_ack(
        self, subject: bytes, _reply: bytes, data: bytes, headers: dict[str, str] | None
    ) -> None:
        try:
            token = int(subject[len(self._prefix) :])
        except ValueError:
            return  # not a reply to one of ours: nothing waits for it
        error = None
        seq = 0
        duplicate = False
        passing = lasting = False
        if headers and headers.get("Status") == "503":
            error = "no stream listens on the subject"  # or none has a leader yet
        else:
            try:
                ack = _ack_decoder.decode(data)
                seq, duplicate = ack.seq, ack.duplicate
                if ack.error is not None:  # the stream's own refusal, as `publish()` takes it
                    error = ack.error.description
                    passing = ack.error.code == _UNAVAILABLE
                    lasting = not passing
            except msgspec.DecodeError:
                error = f"unreadable acknowledgement {data[:80]!r}"
        self._settle(token, error, duplicate, passing, seq, lasting=lasting)

    def _on_refused(self, subject: str, said: str) -> None:
        """The server refused a publish to `subject`: each one still without an ack is
        refused alike (permissions are per subject), and no ack will come. Fail them now, not
        at the timeout, and as refusals: sending again cannot help."""
        refused = [t for t, p in self._pending.items() if p.subject.lower() == subject]
        for token in refused:
            self._settle(token, denied(said), lasting=True)

    def _settle(
        self,
        token: int,
        error: str | None,
        duplicate: bool = False,
        passing: bool = False,
        seq: int = 0,
        *,
        lasting: bool = False,
    ) -> None:
        """End a publish: stored (`error` None), or failed, for a `passing` reason (sent
        again, it may be stored), a `lasting` one (it will not), or one that may be either."""
        pending = self._pending.pop(token, None)
        if pending is None:
            return
        if error is not None and self._requeue is not None:
            self._queue(pending, error, passing, lasting)
        elif error is not None:
            self._fail(pending, error, lasting)
        elif pending.done is not None:
            pending.done("duplicate" if duplicate else "stored", None, seq)
        if self._room is not None:
            self._room.set()
            self._room = None
        if self._drained is not None and not self._pending:
            self._drained.set()
            self._drained = None

    def _fail(self, pending: _Pending, error: str | PublishError, lasting: bool = False) -> None:
        """A publish that was not stored: why (a `PublishRefused` when it is `lasting`) to its
        `done`, and, naming the message, to `flush()`."""
        if isinstance(error, str):
            error = (PublishRefused if lasting else PublishError)(error)
        if pending.report:
            self._failed.append(f"{pending.what} to {pending.subject}: {message_of(error)}")
        if pending.done is not None:
            pending.done("failed", error, None)

    def _queue(self, pending: _Pending, error: str, passing: bool, lasting: bool) -> None:
        """Hand a failed publish to the outbox: at once when it failed for a passing reason,
        else if the refusal may be the stream's absence; `flush()` waits for either."""
        requeue = self._requeue
        assert requeue is not None
        message = (pending.subject, pending.payload, pending.headers, pending.what)
        future: asyncio.Future[Any] = (
            requeue.submit(*message)
            if passing
            else asyncio.ensure_future(requeue.keep_refused(*message, pending.sent_at))
        )
        self._requeued.add(future)

        def queued(future: asyncio.Future[Any]) -> None:
            self._requeued.discard(future)
            failure = None if future.cancelled() else future.exception()
            if failure is not None:
                if not isinstance(failure, PublishError):
                    failure = PublishError(message_of(failure))
                self._fail(pending, failure)
            elif not future.cancelled() and future.result() is False:  # the refusal stands
                self._fail(pending, error, lasting)
            elif pending.done is not None:
                pending.done("queued", None, None)

        future.add_done_callback(queued)
