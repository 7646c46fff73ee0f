"""JetStream pull consumption: one delivery at a time for the worker, pull requests underneath.

`PullConsumer` keeps pull requests outstanding for a durable consumer on its own inbox, asking
for exactly as many messages as it has free slots, the way the Go client's `Consume()` does.
It bypasses nats-py's `fetch()`, which costs a task per message. `Delivery` is the narrow view
of one message that the rest of gdc-worker settles: ack, nak with a delay, in-progress, term.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio
import msgspec
import nats.errors

from ..errors import ConnectionFailed, SubscriptionError

if TYPE_CHECKING:
    from nats.aio.subscription import Subscription

    from .connection import Client

__all__ = ["Delivery", "PullConsumer"]

log = logging.getLogger(__name__)

_ACK = b"+ACK"
_NAK = b"-NAK"
_WPI = b"+WPI"
_TERM = b"+TERM"
_PENDING_MSGS = "Nats-Pending-Messages"
_ACK_PREFIX = b"$JS.ACK."
# 409 descriptions after which the consumer cannot deliver any more.
_FATAL_409 = ("Consumer Deleted", "Consumer is push based")
# A 409 with no pending count that ends the open requests rather than refusing one: the
# consumer's new leader takes the next ones at once.
_LEADERSHIP_CHANGE = "Leadership Change"
# No one took our pull request: the consumer has no leader (one is being elected), or is gone.
_NO_RESPONDERS = "503"
#: How long `stop()` waits for the server to drop our requests and what was on its way.
_DRAIN_TIMEOUT_S = 5.0
#: Heartbeats of silence (or of no leader) after which `unresponsive()` says so.
_UNRESPONSIVE_HEARTBEATS = 3
#: The limits a consumer may set on pull requests, as the server names them when it refuses
#: one over them (its max_batch, and its max_expires as a Go duration such as "1m30s").
_MAX_BATCH = re.compile(r"Exceeded MaxRequestBatch of (\d+)")
_MAX_EXPIRES = re.compile(r"Exceeded MaxRequestExpires of (\S+)")
_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?)(ns|us|µs|μs|ms|s|m|h)")
#: A consumer that settles as many deliveries as it may hold within this many seconds holds
#: twice as many (up to its `max_capacity`); one that takes four times as long, half as many.
_PREFETCH_S = 0.02
#: The shortest idle heartbeat asked for, and half the shortest time `watch()` waits.
_MIN_HEARTBEAT_S = 0.05
_GO_UNITS_S = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


class Delivery:
    """One JetStream message handed to gdc-worker, with the ways to settle it."""

    __slots__ = (
        "_nc",
        "data",
        "deliveries",
        "headers",
        "reply",
        "stream",
        "stream_seq",
        "subject",
    )

    def __init__(
        self, nc: Client, subject: str, reply: str, data: bytes, headers: dict[str, str] | None
    ) -> None:
        self._nc = nc
        self.subject = subject
        self.reply = reply
        self.data = data
        self.headers: dict[str, str] = headers or {}
        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or with a
        # domain and account hash after "ACK" (12 tokens).
        # Raises ValueError for any other shape.
        tokens = reply.split(".")
        if len(tokens) not in (9, 12):
            raise ValueError(f"not a JetStream ack subject: {reply!r}")
        base = 2 if len(tokens) == 9 else 4
        self.stream: str = tokens[base]
        self.deliveries: int = int(tokens[base + 2])
        self.stream_seq: int = int(tokens[base + 3])

    async def ack(self) -> None:
        """The message is handled; JetStream forgets it for this consumer."""
        self._send(_ACK)

    async def nak(self, delay: float = 0.0) -> None:
        """Redeliver the message after `delay` seconds (at once for 0)."""
        payload = _NAK
        if delay > 0:
            payload += b" " + msgspec.json.encode({"delay": int(delay * 1e9)})
        self._send(payload)

    async def in_progress(self) -> None:
        """Still working: restart the consumer's ack wait for this message."""
        self._send(_WPI)

    async def term(self, reason: str = "") -> None:
        """Never redeliver; the reason shows in the server's advisory."""
        # The server keeps 256 bytes of it; cut there, on a character boundary.
        cut = reason.encode()[:256].decode("utf-8", "ignore").encode()
        self._send(_TERM + b" " + cut if cut else _TERM)

    def _send(self, payload: bytes) -> None:
        # Queued as nats-py queues a publish, before any suspension: a cancellation cannot
        # drop it half-way.
        try:
            self._nc.publish_now(self.reply, payload)
        except nats.errors.Error as exc:
            # Unsent, JetStream redelivers the message after the consumer's ack wait.
            raise ConnectionFailed(f"cannot settle message #{self.stream_seq}: {exc}") from None


class PullConsumer:
    """Deliveries of one durable consumer, with at most `capacity` of them unsettled, or up to
    `max_capacity` while they are settled fast: a replica holds only a few milliseconds of
    work ahead of its handlers, as much as keeps fast ones busy and little of slow ones', which
    other replicas can take.

    `start()` it, run `watch()` in a task group, take deliveries with `next()`, and call
    `release()` once per delivery after settling it. After `stop()`, `next()` ends (with
    `EndOfStream`) once what is held was taken.

    Each pull request lasts `expires` seconds, and while it has nothing to deliver the server
    sends a heartbeat every `heartbeat` seconds. Requests die with the consumer's leader (a
    crash, a failover in a cluster) without a word: after two heartbeats of silence they are
    issued again, and every `heartbeat / 2` seconds while the consumer has no leader to take
    them, so deliveries resume within about `heartbeat / 2` of a new leader being elected.
    """

    def __init__(
        self,
        nc: Client,
        stream: str,
        consumer: str,
        *,
        capacity: int,
        max_capacity: int | None = None,
        expires: float = 30.0,
        heartbeat: float = 1.0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: must be at least 1, got {capacity}")
        self._min_capacity = capacity
        self._max_capacity = max(capacity, max_capacity or capacity)
        self._turnover = 0  # deliveries released since...
        self._turnover_since = time.monotonic()  # ... this time
        self._nc = nc
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.name = consumer
        self._capacity = capacity
        # Ask again once this many slots are free, so requests carry batches, not single messages.
        self._threshold = max(1, capacity // 4)
        self._expires_ns = int(expires * 1e9)
        self._heartbeat = heartbeat
        self._heartbeat_ns = int(heartbeat * 1e9)
        self._requested = 0  # asked for and not yet arrived or expired
        # Our last request found no consumer leader, or was refused: ask again soon.
        self._ask_later = False
        self._max_batch = self._max_capacity  # what one request may ask for (see `_refused`)
        self._refusals: set[str] = set()  # the refusals warned about already
        self._paused = False  # pause_fetching(): no new pull requests for now
        self._unanswered_since: float | None = None  # when requests began to find no one
        self._heard = time.monotonic()  # when the server last sent anything to the inbox
        # Since when requests have been open without a pause (None while none is): with them
        # open the server sends a heartbeat every `heartbeat` seconds, so silence means it is
        # not answering (paused, hung, a half-open connection) long before a ping notices.
        self._asking_since: float | None = None
        # Arrived and not yet released, with when they arrived (for keep-alives).
        self._held: dict[int, tuple[Delivery, float]] = {}
        self._last_seen = time.monotonic()
        self._stopping = anyio.Event()
        self._woken = anyio.Event()  # set on stop or failure: watch() acts at once
        self._failure: Exception | None = None
        self._sub: Subscription | None = None
        self._returned: list[Delivery] = []  # handed back while our pull requests were open
        self._inbox = nc.new_inbox()
        self._handoff = _Handoff()
        #: The next delivery; raises `anyio.EndOfStream` once stopped and drained. (The
        #: handoff's own method: no coroutine in between, at every delivery.)
        self.next: Callable[[], Awaitable[Delivery]] = self._handoff.get

    def unresponsive(self) -> str | None:
        """Why this consumer cannot deliver now although the connection looks up (None: it
        can): the server has not answered its open pull requests for three heartbeats, or no
        server has taken them for as long (no consumer leader, or the consumer is gone)."""
        now = time.monotonic()
        limit = _UNRESPONSIVE_HEARTBEATS * self._heartbeat
        asking, leaderless = self._asking_since, self._unanswered_since
        if asking is not None and now - max(self._heard, asking) > limit:
            return f"no answer from NATS for {now - max(self._heard, asking):.0f}s"
        if leaderless is not None and now - leaderless > limit:
            return f"no server takes its pull requests for {now - leaderless:.0f}s (no leader?)"
        return None

    def held_since(self, before: float) -> list[Delivery]:
        """Unsettled deliveries that arrived before `before` (a `time.monotonic()` value)."""
        return [delivery for delivery, arrived in self._held.values() if arrived < before]

    async def start(self) -> None:
        """Subscribe to the inbox and send the first pull request."""
        self._sub = await self._nc.subscribe_direct(self._inbox, self._on_msg)
        self._top_up()

    async def watch(self) -> None:
        """Until `stop()`: re-issue pull requests that went silent; raise if the consumer is gone.

        `next()` raises `EndOfStream` once this has returned and the queue is drained.
        """
        try:
            while not self._stopping.is_set():
                with anyio.move_on_after(self._heartbeat / 2):
                    await self._woken.wait()
                if self._failure is not None:
                    raise self._failure
                if time.monotonic() - self._turnover_since > 4 * _PREFETCH_S:
                    self._adapt()  # slower than that already: hold less without waiting more
                silent = time.monotonic() - self._last_seen > 2 * self._heartbeat
                if self._ask_later:
                    await self.reset()
                elif self._requested and silent:
                    # No message and no heartbeat: the server lost our requests (a restart,
                    # a reconnect, the consumer's leader gone), so ask again.
                    log.info("pull requests for %s went silent; re-issuing", self.name)
                    await self.reset()
        finally:
            self._handoff.end()

    def fail(self, failure: Exception) -> None:
        """Make `watch()` raise `failure` (the connection is gone for good)."""
        self._failure = failure
        self._woken.set()

    def stop_fetching(self) -> None:
        """Issue no more pull requests and hand back what arrives; `stop()` finishes it."""
        self._stopping.set()
        self._woken.set()

    def pause_fetching(self) -> None:
        """Issue no new pull requests until `resume_fetching()`; what was asked for still comes."""
        self._paused = True

    def resume_fetching(self) -> None:
        """Undo `pause_fetching()`: the next `release()` asks for messages again."""
        self._paused = False

    async def stop(self, timeout: float = math.inf) -> None:
        """Ask for no more messages.

        Dropping interest in the inbox makes the server discard our open pull requests, so
        nothing more comes to this consumer; what was already on its way is nak'd at once for
        another replica, as are those given to `hand_back()` so far. Deliveries already handed
        out stay valid. Waits up to `timeout` (at most `_DRAIN_TIMEOUT_S`) for the server to
        confirm; what it sends after that comes back to the stream after the ack wait.
        """
        self.stop_fetching()
        sub, self._sub = self._sub, None
        if sub is None:
            return
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                if self._nc.is_connected:
                    with anyio.move_on_after(min(timeout, _DRAIN_TIMEOUT_S)):
                        # Sends the UNSUB first, then what is queued reaches _on_msg.
                        await sub.drain()  # type: ignore[no-untyped-call]
                        sub = None
                if sub is not None:
                    # Disconnected (the server drops our requests anyway) or slow: let go.
                    await sub.unsubscribe()
            returned, self._returned = self._returned, []
            log.debug("%s stopped; handing back %d delivery(ies)", self.name, len(returned))
            with contextlib.suppress(ConnectionFailed):
                for delivery in returned:
                    await delivery.nak()

    async def hand_back(self, delivery: Delivery) -> None:
        """Give a delivery back to JetStream at once, for another replica (not to this one).

        A nak while our pull requests are open would come straight back to us, so until
        `stop()` has dropped them, the delivery is kept and nak'd there.
        """
        self._give_back(delivery)

    def _give_back(self, delivery: Delivery) -> None:
        if self._sub is not None:
            self._returned.append(delivery)
        else:
            delivery._send(_NAK)

    async def close(self, timeout: float = math.inf) -> None:
        """Stop (see `stop`), and nak the deliveries that were never taken with `next()`."""
        await self.stop(timeout)
        self._handoff.end()
        # Without a connection the naks cannot go: those come back after the ack wait.
        with anyio.CancelScope(shield=True), contextlib.suppress(ConnectionFailed):
            for delivery in self._handoff.take_all():
                await delivery.nak()

    async def reset(self) -> None:
        """Forget outstanding requests (they are gone after a reconnect) and ask again."""
        self._requested = 0
        self._ask_later = False
        self._last_seen = time.monotonic()
        self._top_up()

    def release(self, delivery: Delivery) -> None:
        """`delivery` is settled: its slot is free again."""
        del self._held[id(delivery)]
        self._turnover += 1
        if self._turnover >= self._capacity:
            self._adapt()
        if self._capacity - len(self._held) - self._requested >= self._threshold:
            self._top_up()

    def _adapt(self) -> None:
        """As many deliveries as it holds are settled, or `watch()` looks: hold twice as many
        if they were settled within `_PREFETCH_S`, half as many (down to the capacity it was
        made with) after four times that."""
        now = time.monotonic()
        took = now - self._turnover_since
        self._turnover, self._turnover_since = 0, now
        if took < _PREFETCH_S:
            capacity = min(2 * self._capacity, self._max_capacity)
        elif took > 4 * _PREFETCH_S:
            capacity = max(self._capacity // 2, self._min_capacity)
        else:
            return
        self._capacity = capacity
        self._threshold = max(1, capacity // 4)

    def _top_up(self) -> None:
        free = self._capacity - len(self._held) - self._requested
        if (
            self._stopping.is_set()
            or self._paused
            or self._ask_later
            or free < min(self._threshold, self._max_batch)
            or not self._nc.is_connected
        ):
            return
        if self._asking_since is None:
            self._asking_since = time.monotonic()
        while free > 0:  # more than one request when the consumer's max_batch is below it
            batch = min(free, self._max_batch)
            free -= batch
            self._requested += batch
            request = {
                "batch": batch,
                "expires": self._expires_ns,
                "idle_heartbeat": self._heartbeat_ns,
            }
            self._nc.publish_now(self._next_subject, msgspec.json.encode(request), self._inbox)

    def _on_msg(
        self, subject: bytes, reply: bytes, data: bytes, headers: dict[str, str] | None
    ) -> None:
        """A message on the inbox, in the client's read loop (a direct subscription)."""
        self._last_seen = self._heard = time.monotonic()
        # A stored message always comes with its $JS.ACK reply subject; a status from the
        # server (heartbeat, end of a request) never does. Headers cannot tell them apart:
        # anyone may publish an event with a `Status` header.
        if reply.startswith(_ACK_PREFIX):
            if self._unanswered_since is not None:
                self._answered()
            try:
                delivery = Delivery(self._nc, subject.decode(), reply.decode(), data, headers)
            except ValueError:
                log.warning("%s: ignoring a malformed reply subject %r", self.name, reply)
                return
            if self._stopping.is_set():
                self._give_back(delivery)
                return
            if self._requested:
                self._requested -= 1
                if not self._requested:
                    self._asking_since = None
            self._held[id(delivery)] = (delivery, self._last_seen)
            self._handoff.put(delivery)
            return
        headers = headers or {}
        status = headers.get("Status")
        if status == _NO_RESPONDERS:
            self._on_no_responders()
            return
        if self._unanswered_since is not None:
            self._answered()
        if status == "100":  # idle heartbeat
            return
        description = headers.get("Description", "")
        if status == "409" and description.startswith(_FATAL_409):
            self.fail(SubscriptionError(f"consumer {self.name}: {description}"))
            return
        if status is None:
            log.warning(
                "%s: ignoring a message on the pull inbox that JetStream did not send", self.name
            )
            return
        pending = headers.get(_PENDING_MSGS)
        if pending is None and status in ("400", "409") and description != _LEADERSHIP_CHANGE:
            self._refused(description)
            return
        # 404/408/409: a request ended; the pending count says how many it never delivered.
        self._requested = max(0, self._requested - int(pending)) if pending else 0
        if not self._requested:
            self._asking_since = None
        if status not in ("404", "408"):
            log.debug("pull request for %s ended: %s %s", self.name, status, description)
        self._top_up()

    def _refused(self, description: str) -> None:
        """The server refused a pull request outright. Over a limit the consumer sets on them
        (its max_batch or max_expires), this keeps to it from now on; for any other reason
        (too many requests waiting, say) it warns once. Either way every request is asked
        again at `watch()`'s next look, never in a loop of refusals."""
        self._requested = 0  # the open requests end alike: all are asked for again
        self._asking_since = None
        self._ask_later = True
        if batch := _MAX_BATCH.fullmatch(description):
            limit = int(batch.group(1))
            if 0 < limit < self._max_batch:
                self._max_batch = limit
                log.info("consumer %s takes at most %d per pull request", self.name, limit)
            return
        expires = _MAX_EXPIRES.fullmatch(description)
        seconds = _go_duration(expires.group(1)) if expires else None
        if seconds:
            if seconds * 1e9 < self._expires_ns:
                self._expires_ns = int(seconds * 1e9)
                # The server takes a heartbeat of half a request's life at most; none at all
                # for requests too short to need one (their ends say the server is there).
                heartbeat = min(self._heartbeat, seconds / 2)
                self._heartbeat = max(heartbeat, _MIN_HEARTBEAT_S)
                self._heartbeat_ns = int(heartbeat * 1e9) if heartbeat >= _MIN_HEARTBEAT_S else 0
                log.info("consumer %s keeps a pull request %gs at most", self.name, seconds)
            return
        if description not in self._refusals:
            self._refusals.add(description)
            log.warning(
                "consumer %s refused a pull request (%s); asking again every %gs",
                self.name,
                description or "no reason given",
                self._heartbeat / 2,
            )

    def _answered(self) -> None:
        since, self._unanswered_since = self._unanswered_since, None
        log.info(
            "consumer %s takes pull requests again after %.1fs",
            self.name,
            self._last_seen - (since or self._last_seen),
        )

    def _on_no_responders(self) -> None:
        # No server took a pull request: the consumer has no leader (one is being elected after
        # the last one died), or it is gone. The requests the old leader had died with it.
        # Asking again at once would spin until there is a leader: watch() asks again shortly.
        if self._unanswered_since is None:
            self._unanswered_since = self._last_seen
            log.info(
                "no server takes pull requests for consumer %s (no leader yet, or it is "
                "gone); asking again every %gs",
                self.name,
                self._heartbeat / 2,
            )
        self._requested = 0
        self._ask_later = True


class _Handoff:
    """Deliveries waiting for a worker, and the workers waiting for a delivery.

    Unlike a queue, it wakes one more waiting worker only when the one that took a delivery
    yields to the event loop with deliveries still left: while handlers return without
    suspending, one worker takes a whole burst with no task switch per message (the largest
    cost at high rates), and as soon as handlers wait on I/O, more workers join in.
    """

    def __init__(self) -> None:
        self._ready: collections.deque[Delivery] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._check_scheduled = False
        self._ended = False

    def put(self, delivery: Delivery) -> None:
        self._ready.append(delivery)
        if len(self._ready) == 1:
            self._wake_one()

    def end(self) -> None:
        """No more puts: waiting and later `get()`s raise `EndOfStream` once it is empty."""
        self._ended = True
        while self._waiters:
            self._wake_one()

    def take_all(self) -> list[Delivery]:
        taken = list(self._ready)
        self._ready.clear()
        return taken

    async def get(self) -> Delivery:
        while True:
            if self._ready:
                delivery = self._ready.popleft()
                if self._ready and self._waiters and not self._check_scheduled:
                    self._check_scheduled = True
                    asyncio.get_running_loop().call_soon(self._check)
                return delivery
            if self._ended:
                raise anyio.EndOfStream
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # we were woken but will not take: pass it on
                else:
                    waiter.cancel()
                raise

    def _check(self) -> None:
        # The worker that took the last delivery yielded with more left: wake another.
        self._check_scheduled = False
        if self._ready:
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _go_duration(text: str) -> float | None:
    """Seconds in a Go duration as the server prints one ("5s", "1m30s", "1.5ms"); None for
    anything else."""
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    return sum(float(number) * _GO_UNITS_S[unit] for number, unit in parts)
